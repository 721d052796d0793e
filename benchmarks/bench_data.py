"""The data pipeline at scale, on a CPU: memory of tokenising a large JSONL corpus, and of ranks
reading it.

    python benchmarks/bench_data.py                          # 0.05 GB and 2 GB corpora
    python benchmarks/bench_data.py --small-gb 0.02 --large-gb 0.2 --num-workers 2

For each corpus (generated chat records: a question and an answer of 100-1,200 random words of the
project's bundled text), in fresh processes:

1. build: `build_datasets` tokenises the corpus with the project's small tokenizer into its
   memory-mapped store and packs it; reported: time, samples, tokens, store size, and the peak
   RSS of the main process and of the largest tokenising worker;
2. ranks: two processes (gloo) map the store, pack, and each reads `--steps` micro-batches through
   `PackedLoader`; reported per rank: peak RSS, and at the end the private (anonymous) and the
   file-backed resident memory. File-backed pages are the store's, shared by the ranks through
   the page cache and dropped by the kernel when memory is short; the private memory is what a
   rank costs, and it holds only the packing plan (tens of bytes per sample).

The corpora and stores go to --workdir (a temporary directory removed at the end by default).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 10**9
CORPUS = Path(__file__).resolve().parent.parent / "qwen35" / "data" / "corpus.txt"


def generate(path: Path, size: int, seed: int = 0) -> int:
    """Chat records until the file holds `size` bytes; returns the record count."""
    words = CORPUS.read_text().split()
    rng = random.Random(seed)
    written = records = 0
    with open(path, "w") as f:
        while written < size:
            question = f"Question {records}: " + " ".join(rng.choices(words, k=rng.randint(10, 40)))
            answer = " ".join(rng.choices(words, k=rng.randint(100, 1200)))
            line = json.dumps({"messages": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}]}) + "\n"
            written += f.write(line)
            records += 1
    return records


def memory() -> dict[str, float]:
    """This process's resident memory in GB: peak, now, private and file-backed."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024 / GB
    return fields


def data_config(corpus: Path, cache: Path, args) -> dict:
    return {"train_path": str(corpus), "seq_len": args.seq_len, "cache_dir": str(cache),
            "num_workers": args.num_workers}


def build(corpus: Path, cache: Path, args) -> dict:
    from transformers import AutoTokenizer

    from qwen35.data.dataset import build_datasets

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    start = time.perf_counter()
    data = build_datasets(data_config(corpus, cache, args), tokenizer, progress=False)
    seconds = time.perf_counter() - start
    file = data.train.files[0]
    return {"seconds": seconds, "samples": len(file), "tokens": int(file.offsets[-1]),
            "rows": len(data.train), "store_gb": sum(p.stat().st_size for p in cache.rglob("*")) / GB,
            "peak_main_gb": memory()["VmHWM"],
            # ru_maxrss of children: the largest one that has been waited for (KiB on Linux)
            "peak_worker_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB}


def rank_main(rank: int, corpus: str, cache: str, args, init: str, results) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from qwen35.data.dataset import build_datasets
    from qwen35.data.loader import PackedLoader

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    data = build_datasets(data_config(Path(corpus), Path(cache), args), tokenizer, progress=False)
    loader = PackedLoader(data.train, args.micro_batch_size, seed=0, rank=rank, world_size=2)
    tokens = 0
    for _, batch in zip(range(args.steps), loader):
        tokens += int((batch["labels"] != -100).sum())
    results[rank] = {**memory(), "loss_tokens": tokens}
    dist.barrier()
    dist.destroy_process_group()


def ranks(corpus: Path, cache: Path, args) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(rank_main, (str(corpus), str(cache), args, f"file://{tmp}/init", results), nprocs=2)
        return [dict(results[r]) for r in range(2)]


def child(phase: str, corpus: Path, cache: Path, args) -> dict | list:
    """Runs one phase in a fresh interpreter, so that its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--phase", phase, "--corpus", str(corpus), "--cache", str(cache),
           "--tokenizer", str(args.tokenizer), "--seq-len", str(args.seq_len),
           "--num-workers", str(args.num_workers), "--steps", str(args.steps),
           "--micro-batch-size", str(args.micro_batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-gb", type=float, default=0.05)
    parser.add_argument("--large-gb", type=float, default=2.0)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--num-workers", type=int, default=2, help="tokenising processes")
    parser.add_argument("--steps", type=int, default=200, help="micro-batches each rank reads")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given; else a temporary one")
    parser.add_argument("--phase", choices=["build", "ranks"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        result = (build if args.phase == "build" else ranks)(args.corpus, args.cache, args)
        print(json.dumps(result))
        return

    from qwen35.data.tokenizer import build_tokenizer

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.tokenizer = workdir / "tokenizer"
    build_tokenizer(args.tokenizer)
    rows = []
    try:
        for name, size_gb in (("small", args.small_gb), ("large", args.large_gb)):
            corpus, cache = workdir / f"{name}.jsonl", workdir / f"{name}-cache"
            start = time.perf_counter()
            records = generate(corpus, int(size_gb * GB))
            print(f"{name}: generated {corpus.stat().st_size / GB:.2f} GB, {records} records in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            shutil.rmtree(cache, ignore_errors=True)
            built = child("build", corpus, cache, args)
            print(f"{name}: built {json.dumps(built)}", flush=True)
            per_rank = child("ranks", corpus, cache, args)
            print(f"{name}: ranks {json.dumps(per_rank)}", flush=True)
            rows.append((name, corpus.stat().st_size / GB, built, per_rank))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"seq_len {args.seq_len}, {args.num_workers} tokenising workers, 2 ranks x {args.steps} "
          f"micro-batches of {args.micro_batch_size} rows; memory in GB")
    print("| corpus | JSONL GB | samples | tokens | store GB | build s | build peak RSS: main / worker "
          "| rank peak RSS (0 / 1) | rank private RSS | rank file-backed RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, size, b, r in rows:
        print(f"| {name} | {size:.2f} | {b['samples']:,} | {b['tokens']:,} | {b['store_gb']:.2f} | "
              f"{b['seconds']:.0f} | {b['peak_main_gb']:.2f} / {b['peak_worker_gb']:.2f} | "
              f"{r[0]['VmHWM']:.2f} / {r[1]['VmHWM']:.2f} | {r[0]['RssAnon']:.2f} / {r[1]['RssAnon']:.2f} | "
              f"{r[0]['RssFile']:.2f} / {r[1]['RssFile']:.2f} |")


if __name__ == "__main__":
    main()
