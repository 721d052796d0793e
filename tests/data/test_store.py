"""The tokenised data store: built once per file, memory-mapped, shared by ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from qwen35.data import tokenized
from qwen35.data.dataset import build_datasets

HERE = Path(__file__).parent


def write_texts(path, prefix, n):
    path.write_text("".join(json.dumps({"text": f"{prefix} {i} " + "word " * (i % 7)}) + "\n"
                            for i in range(n)))
    return path


def rows_of(dataset) -> tuple[np.ndarray, np.ndarray]:
    rows = [dataset[i] for i in range(len(dataset))]
    return (np.stack([r["input_ids"].numpy() for r in rows]),
            np.stack([r["labels"].numpy() for r in rows]))


def test_a_store_is_built_once_and_mapped_from_disk_after(tokenizer, tmp_path, monkeypatch):
    spec = f"{write_texts(tmp_path / 'a.jsonl', 'apple', 40)},{write_texts(tmp_path / 'b.jsonl', 'berry', 30)}"
    config = {"train_path": spec, "seq_len": 64, "cache_dir": str(tmp_path / "cache")}
    first = build_datasets(config, tokenizer, progress=False)
    assert (first.stats.files, first.stats.files_from_cache) == (2, 0)
    assert all(isinstance(f.ids, np.memmap) and isinstance(f.loss, np.memmap) for f in first.train.files)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one store per file, nothing left over

    def no_reading(*args, **kwargs):
        raise AssertionError("a second build must not read the data files")

    monkeypatch.setattr(tokenized, "iter_records", no_reading)
    second = build_datasets(config, tokenizer, progress=False)
    assert second.stats.files_from_cache == 2 and second.stats.records == 70
    for a, b in zip(rows_of(first.train), rows_of(second.train)):
        np.testing.assert_array_equal(a, b)


def test_without_a_cache_dir_the_temporary_store_is_removed_but_stays_readable(tokenizer, tmp_path):
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("qwen35-data-*"))
    data = build_datasets({"train_path": str(write_texts(tmp_path / "a.jsonl", "apple", 20)),
                           "seq_len": 64}, tokenizer, progress=False)
    assert set(Path(tempfile.gettempdir()).glob("qwen35-data-*")) == before
    ids, _ = rows_of(data.train)
    assert "apple 19" in tokenizer.decode(ids.ravel())


def test_workers_stream_batches_in_file_order(tokenizer, tmp_path, monkeypatch):
    path = write_texts(tmp_path / "a.jsonl", "apple", 600)
    serial = tokenized.tokenize_file(path, tokenizer, progress=False)
    monkeypatch.setattr(tokenized, "MIN_SAMPLES_FOR_WORKERS", 0)
    monkeypatch.setattr(tokenized, "BATCH", 16)  # many batches in flight
    parallel = tokenized.tokenize_file(path, tokenizer, num_workers=2, progress=False)
    for name in ("ids", "loss", "offsets", "learned"):
        np.testing.assert_array_equal(getattr(serial, name), getattr(parallel, name))


def test_two_ranks_share_one_store_and_see_the_rows_of_one_process(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    spec = f"{write_texts(tmp_path / 'a.jsonl', 'apple', 40)},{write_texts(tmp_path / 'b.jsonl', 'berry', 30)}"
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(HERE / "two_ranks.py"), str(tmp_path / "tokenizer"), spec, str(cache), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(cache.iterdir())) == 2  # each file tokenised once, by one rank
    one = build_datasets({"train_path": spec, "seq_len": 64, "cache_dir": str(cache)}, tokenizer,
                         progress=False)
    assert one.stats.files_from_cache == 2
    expected = rows_of(one.train)
    for rank in (0, 1):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert info == {"files_from_cache": 0, "mapped": True}  # built by this run, then mapped
        with np.load(tmp_path / f"rank{rank}.npz") as seen:
            np.testing.assert_array_equal(seen["input_ids"], expected[0])
            np.testing.assert_array_equal(seen["labels"], expected[1])
