"""The training benchmark's parallel runs: tokens/s and the longest trainable row of one packed
row shared by sp or cp ranks, against one GPU, in the same command.

    python benchmarks/bench_train.py --parallel one sp2 cp2 --presets 0.8B 2B

`bench_train.py --parallel` runs each layout (`one`: one GPU; `sp2`/`cp2`: Ulysses or context
parallelism over 2 GPUs, FSDP over both) as its own `torchrun` job of this file, which writes
one JSON line per trial. A job per layout keeps one layout's failure (an out-of-memory that
leaves the other rank waiting in a collective until the process-group timeout) from ending the
others. Every trial takes the trainer's step (`qwen35.train.step.forward_backward`): float32
master weights, bf16 autocast on a GPU, AdamW with its state, the loss normalised as one process
normalises it.

- throughput: `--seq-lens` rows of `--docs` documents, `--ac` checkpointing (default full),
  `--warmup` then `--steps` timed steps, for every preset (none with `--only-max-context`);
- longest row: one document of each `--max-context-lens` length, ascending, "offload"
  checkpointing, one step each, until the first failure; `--max-context-preset` only.

tokens/s counts the row's tokens once, however many ranks share it; peak memory is the largest
over the ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as bench_train.py, before CUDA starts

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

LAYOUT = re.compile(r"(sp|cp)([2-9]|[1-9][0-9]+)")


def parse_layout(text: str) -> tuple[str | None, int]:
    """"one" -> (None, 1); "sp2" -> ("sp", 2); "cp4" -> ("cp", 4)."""
    if text == "one":
        return None, 1
    match = LAYOUT.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"unknown parallel layout {text!r}: one, sp<N> or cp<N> with N >= 2")
    return match[1], int(match[2])


def worker_command(layout: str, args, out: Path) -> list[str]:
    """The torchrun command of one layout's job (its ranks: the layout's degree)."""
    _, degree = parse_layout(layout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={degree}",
           str(Path(__file__).resolve()), "--layout", layout, "--out", str(out),
           "--presets", *([] if args.only_max_context else args.presets), "--seq-lens", *map(str, args.seq_lens), "--docs", str(args.docs[0]),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--ac", args.parallel_ac,
           "--max-context-preset", args.max_context_preset]
    if args.max_context:
        cmd += ["--max-context-lens", *map(str, args.max_context_lens)]
    return cmd + (["--smoke"] if args.smoke else [])


def run_layouts(args) -> list[dict]:
    """Each layout as its own torchrun job; the trials every job wrote, in order."""
    rows = []
    for layout in args.parallel:
        out = Path(args.parallel_dir) / f"{layout}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        cmd = worker_command(layout, args, out)
        print("layout job:", " ".join(cmd), flush=True)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.run(cmd, env=env, timeout=args.parallel_timeout)
        done = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
        if proc.returncode != 0:  # the trial after the last written one failed without a word
            print(f"[{layout}] job ended with exit code {proc.returncode} after {len(done)} trials", flush=True)
            if done and done[-1]["status"] == "ok":
                done.append({**done[-1], "status": f"crashed (exit {proc.returncode}), likely out of memory",
                             "seq_len": None})
        rows += done
    print("\n" + parallel_table(rows), flush=True)
    return rows


def parallel_table(rows: list[dict]) -> str:
    """Throughput rows with their ratio to one GPU, then the longest row per layout."""
    one = {(r["preset"], r["seq_len"]): r for r in rows
           if r["layout"] == "one" and r["trial"] == "throughput" and r["status"] == "ok"}
    lines = ["| layout | preset | seq | docs | tokens/s | step ms | peak GiB (largest rank) | vs one GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["trial"] != "throughput":
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['layout']} | {r['preset']} | {r['seq_len']} | {r['docs']} | {r['status']} | | | |")
            continue
        base = one.get((r["preset"], r["seq_len"]))
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and r["layout"] != "one" else ""
        lines.append(f"| {r['layout']} | {r['preset']} | {r['seq_len']} | {r['docs']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_ms']:.0f} | {r['peak_gib']:.1f} | {ratio} |")
    longest, stopped = {}, set()
    for r in rows:
        if r["trial"] == "max-context" and r["status"] == "ok":
            longest[r["layout"], r["preset"]] = max(longest.get((r["layout"], r["preset"]), 0), r["seq_len"])
        elif r["trial"] == "max-context" and r["status"] == "stopped for time":
            stopped.add((r["layout"], r["preset"]))
    if longest:
        lines.append("\nlongest trainable row (one document, offload checkpointing):")
        for (layout, name), length in longest.items():
            base = longest.get(("one", name))
            ratio = f" ({length / base:.2f}x one GPU)" if base and layout != "one" else ""
            bound = " or more (the search stopped for time)" if (layout, name) in stopped else ""
            lines.append(f"  {layout:4} {name}: {length:,} tokens{bound}{ratio}")
    return "\n".join(lines)


# --- the job of one layout (under torchrun) -------------------------------------------------


def _global_sum(n: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        n = n.clone()
        dist.all_reduce(n)
    return n


def _agree_max(value: float, device) -> float:
    t = torch.tensor([value], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def trial(bench, config, layout: str, lengths: list[int], steps: int, warmup: int, ac: str, device, group) -> dict:
    """One model built, sharded and stepped as the trainer does; status "ok", "OOM" or an error
    (agreed over the ranks)."""
    from qwen35 import Qwen35ForCausalLM
    from qwen35.parallel.checkpointing import apply_activation_checkpointing
    from qwen35.parallel.context import apply_context_parallel
    from qwen35.parallel.fsdp import apply_fsdp, data_parallel_mesh
    from qwen35.parallel.sequence import apply_sequence_parallel
    from qwen35.train.step import forward_backward

    kind, degree = parse_layout(layout)
    status, seconds = "ok", 0.0
    try:
        torch.manual_seed(0)
        model = Qwen35ForCausalLM.from_config(config, device=device)
        if kind is not None:
            {"sp": apply_sequence_parallel, "cp": apply_context_parallel}[kind](model, group)
        apply_activation_checkpointing(model, ac)
        if degree > 1:
            apply_fsdp(model, data_parallel_mesh(device.type))
        bench._reset_peak(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=device.type == "cuda" or None)
        bench._with_optimizer_state(optimizer, params)
        batch = bench.packed_batch(config.vocab_size, lengths, device)
        autocast = torch.bfloat16 if device.type == "cuda" else None

        def step():
            forward_backward(model, [batch], _global_sum, autocast, 0.0, degree, "micro_batch", degree)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = bench._timed_steps(step, steps, warmup, device)
    except torch.OutOfMemoryError:
        status = "OOM"
    except Exception as e:  # reported in the table, the next trial still runs
        status = f"error: {type(e).__name__}: {str(e)[:200]}"
    failed = _agree_max(float(status != "ok"), device)
    peak = _agree_max(bench._peak_gib(device), device)
    bench._cleanup()
    if failed and status == "ok":
        status = "failed on another rank"
    tokens = sum(lengths)
    return {"layout": layout, "preset": None, "seq_len": tokens, "docs": len(lengths), "status": status,
            "tokens_per_s": tokens / seconds if status == "ok" else 0.0, "step_ms": seconds * 1e3,
            "peak_gib": peak}


def worker(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layout", required=True, type=lambda s: parse_layout(s) and s)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--presets", nargs="*", default=["0.8B"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[65536])
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ac", default="full")
    p.add_argument("--max-context-lens", nargs="*", type=int, default=[])
    p.add_argument("--max-context-preset", default="0.8B")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_train as bench
    from qwen35 import ops, preset
    from qwen35.parallel.sequence import parallel_mesh

    kind, degree = parse_layout(args.layout)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ops.use_backend("reference" if args.smoke else "fast")
    group = None
    if degree > 1:
        dist.init_process_group("gloo" if args.smoke else "nccl", timeout=datetime.timedelta(minutes=3))
        group = parallel_mesh(device.type, degree)["seq"].get_group()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0

    def record(row: dict, name: str, what: str) -> None:
        row.update(preset=name, trial=what)
        if rank0:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{args.layout}] {what} {name} {row['seq_len']} tokens: {row['status']}, "
                  f"{row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_gib']:.1f} GiB", flush=True)

    for name in args.presets:
        config = bench.smoke_config(name) if args.smoke else preset(name)
        for seq_len in args.seq_lens:
            lengths = bench.document_lengths(seq_len, args.docs)
            record(trial(bench, config, args.layout, lengths, args.steps, args.warmup, args.ac, device, group),
                   name, "throughput")
    name = args.max_context_preset
    config = bench.smoke_config(name) if args.smoke else preset(name)
    for length in args.max_context_lens:
        started = time.perf_counter()
        row = trial(bench, config, args.layout, [length], 1, 0, "offload", device, group)
        record(row, name, "max-context")
        if row["status"] != "ok":
            break
        if time.perf_counter() - started > 240 and length != args.max_context_lens[-1]:  # the next: too long
            record({**row, "status": "stopped for time"}, name, "max-context")
            break
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    worker()
