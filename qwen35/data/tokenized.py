"""Tokenising a data file once into a memory-mapped store on disk.

A file's samples are stored flat, one store directory per file: `ids.bin` (the token ids of all
samples end to end: uint16 when the vocabulary fits, else int32), `loss.bin` (bool per token),
`offsets.bin` (int64, samples + 1: where each sample starts), `learned.bin` (int64 per sample: its
loss tokens, so that packing never scans the token arrays) and `meta.json` (records read, malformed
records, the first problems). The arrays are opened with `np.memmap`: nothing is read until a row
asks for it, and every process that maps the same store shares one copy through the OS page cache,
so a rank costs the same memory whatever the corpus size.

Building streams: records are read in batches (formats.iter_records), encoded in worker processes
when asked, and appended to the files, so building a store of any size takes a batch of memory.
The store is written under a temporary name and renamed into place when complete: a reader never
sees half a store, and two processes building the same store at once both end with a whole one.

The store's name carries a hash of everything that decides its content: the data file (path, size,
modification time), the tokenizer (its full tokenizer.json, special tokens and chat template), the
chat-template arguments and the encoder's version. Change any of these and the file is tokenised
again; change none and the store is reused at once. Packing settings (seq_len, overlong, weights,
split) are not part of it: packing reads only the per-sample lengths and reruns in seconds.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen35.data.formats import DataError, MalformedRecord, iter_records, parse_record, to_sample
from qwen35.data.render import ChatRenderer
from qwen35.progress import progress as progress_bar

# Bump when the encoding of a sample or the store layout changes, so that old stores are not read.
ENCODER_VERSION = 2
# Below this many samples worker start-up (each imports transformers) costs more than it saves.
MIN_SAMPLES_FOR_WORKERS = 2000
# Records per batch handed to a worker; the main process keeps two batches per worker in flight.
BATCH = 256
# Problem messages kept per file (all are counted): a file of a million bad lines stays readable.
MAX_PROBLEMS = 100


@dataclass
class TokenizedFile:
    path: Path
    ids: np.ndarray  # uint16 or int32 [tokens], usually memory-mapped
    loss: np.ndarray  # bool [tokens]
    offsets: np.ndarray  # int64 [samples + 1]
    records: int  # records read, usable or not
    problems: list[str]  # "where: reason" of the first MAX_PROBLEMS malformed records
    malformed: int | None = None  # malformed records; None: len(problems)
    learned: np.ndarray | None = None  # int64 [samples]: loss tokens per sample; None: counted
    from_cache: bool = False

    def __post_init__(self) -> None:
        if self.malformed is None:
            self.malformed = len(self.problems)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def loss_counts(self) -> np.ndarray:
        if self.learned is not None:
            return np.asarray(self.learned)
        counts = np.concatenate([[0], np.cumsum(self.loss, dtype=np.int64)])
        return counts[self.offsets[1:]] - counts[self.offsets[:-1]]


def tokenizer_fingerprint(tokenizer, template_kwargs: dict | None = None,
                          chat_template: str | None = None) -> str:
    parts = [
        tokenizer.backend_tokenizer.to_str(),
        str(chat_template if chat_template is not None else tokenizer.chat_template),
        json.dumps([tokenizer.eos_token, tokenizer.pad_token], default=str),
        json.dumps(template_kwargs or {}, sort_keys=True, default=str),
        str(ENCODER_VERSION),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def store_path(cache_dir: Path, path: Path, fingerprint: str) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{fingerprint}"
    return Path(cache_dir) / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def is_complete(store: Path) -> bool:
    return (store / "meta.json").is_file()


def tokenize_file(path: Path, tokenizer, *, num_workers: int = 0, cache_dir: str | Path | None = None,
                  on_malformed: str = "skip", template_kwargs: dict | None = None,
                  chat_template: str | None = None, fingerprint: str | None = None,
                  progress: bool = True) -> TokenizedFile:
    """All usable samples of one data file as memory-mapped tokens, from the store in `cache_dir`
    when it is there (else built into it). Without `cache_dir` the store is built in a temporary
    directory that is removed once mapped (the mapping keeps the data readable)."""
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="qwen35-data-") as tmp:
            return tokenize_file(path, tokenizer, num_workers=num_workers, cache_dir=tmp,
                                 on_malformed=on_malformed, template_kwargs=template_kwargs,
                                 chat_template=chat_template, fingerprint=fingerprint,
                                 progress=progress)
    fingerprint = fingerprint or tokenizer_fingerprint(tokenizer, template_kwargs, chat_template)
    store = store_path(Path(cache_dir), path, fingerprint)
    built = not is_complete(store)
    if built:
        build_store(path, store, tokenizer, num_workers=num_workers, on_malformed=on_malformed,
                    template_kwargs=template_kwargs, chat_template=chat_template, progress=progress)
    result = open_store(store, path, from_cache=not built)
    if result.problems and on_malformed == "error":
        raise MalformedRecord(result.problems[0])
    return result


def open_store(store: Path, path: Path, from_cache: bool = True) -> TokenizedFile:
    meta = json.loads((store / "meta.json").read_text())

    def mapped(name: str, dtype: str, count: int) -> np.ndarray:
        if count == 0:  # np.memmap refuses an empty file
            return np.zeros(0, dtype)
        return np.memmap(store / name, dtype=dtype, mode="r", shape=(count,))

    tokens, samples = meta["tokens"], meta["samples"]
    return TokenizedFile(
        path=path, ids=mapped("ids.bin", meta["id_dtype"], tokens),
        loss=mapped("loss.bin", "bool", tokens),
        offsets=mapped("offsets.bin", "int64", samples + 1),
        records=meta["records"], problems=meta["problems"], malformed=meta["malformed"],
        learned=mapped("learned.bin", "int64", samples), from_cache=from_cache)


def build_store(path: Path, store: Path, tokenizer, *, num_workers: int = 0, on_malformed: str = "skip",
                template_kwargs: dict | None = None, chat_template: str | None = None,
                progress: bool = True) -> None:
    """Streams `path` through the chat template into the store's files (see the module docstring).
    An empty file is a DataError naming it; so is a malformed record with on_malformed="error"."""
    id_dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.int32)
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    records = malformed = tokens = samples = 0
    problems: list[str] = []
    bar = progress_bar(None, f"tokenising {path.name}", enabled=progress, unit=" records")
    try:
        # closing(): an error stops the worker processes at once
        with (open(tmp / "ids.bin", "wb") as ids_f, open(tmp / "loss.bin", "wb") as loss_f,
              open(tmp / "offsets.bin", "wb") as offsets_f, open(tmp / "learned.bin", "wb") as learned_f,
              contextlib.closing(_encoded_batches(path, tokenizer, template_kwargs, chat_template,
                                                  num_workers)) as batches):
            offsets_f.write(np.zeros(1, np.int64).tobytes())
            for batch in batches:
                encoded = []
                for result in batch:
                    if isinstance(result, str):
                        if on_malformed == "error":
                            raise MalformedRecord(result)
                        malformed += 1
                        if len(problems) < MAX_PROBLEMS:
                            problems.append(result)
                    else:
                        encoded.append(result)
                records += len(batch)
                bar.update(len(batch))
                if not encoded:
                    continue
                # one write per file and batch: the files are the samples' arrays end to end
                ids_f.write(np.concatenate([ids for ids, _ in encoded]).astype(id_dtype).tobytes())
                loss_f.write(np.concatenate([mask for _, mask in encoded]).astype(bool).tobytes())
                ends = tokens + np.cumsum([len(ids) for ids, _ in encoded], dtype=np.int64)
                offsets_f.write(ends.tobytes())
                learned_f.write(np.asarray([int(mask.sum()) for _, mask in encoded], np.int64).tobytes())
                tokens = int(ends[-1])
                samples += len(encoded)
        if records == 0:
            raise DataError(f"{path}: the file holds no records (is it empty?)")
        meta = {"records": records, "malformed": malformed, "problems": problems, "tokens": tokens,
                "samples": samples, "id_dtype": id_dtype.name, "source": str(path)}
        (tmp / "meta.json").write_text(json.dumps(meta))  # written last: it marks the store complete
        try:
            os.replace(tmp, store)
        except OSError:  # another process finished the same store first: theirs is as good
            if not is_complete(store):
                raise
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _encoded_batches(path: Path, tokenizer, template_kwargs, chat_template, num_workers: int):
    """Lists of encoded records ((ids, mask) or a problem message), in file order."""
    items = iter_records(path)
    # A short file is not worth the workers' start-up: look ahead before starting them.
    head = list(itertools.islice(items, MIN_SAMPLES_FOR_WORKERS))
    items = itertools.chain(head, items)
    if num_workers <= 0 or len(head) < MIN_SAMPLES_FOR_WORKERS:
        renderer = ChatRenderer(tokenizer, template_kwargs, chat_template)
        for batch in _batched(items, BATCH):
            yield _encode(renderer, batch)
        return
    # fork where there is one: spawn re-runs the caller's main module in every worker, which fails
    # for notebooks and `python -` and costs a transformers import per worker. The workers use
    # only the tokenizer, never torch, so torch's threads in the parent are safe. Batches go out
    # through apply_async with a bounded number in flight: Pool.imap would read the whole file
    # ahead into its task queue.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(num_workers, _init_worker, (tokenizer, template_kwargs, chat_template)) as pool:
        pending: collections.deque = collections.deque()
        for batch in _batched(items, BATCH):
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _batched(items, n: int):
    while batch := list(itertools.islice(items, n)):
        yield batch


def _encode(renderer: ChatRenderer, batch: list) -> list:
    """The batch's records encoded, each (ids, mask) or the message of its problem (exceptions do
    not cross processes well)."""
    results: list = [None] * len(batch)
    samples, where_ok = [], []
    for i, (where, record) in enumerate(batch):
        try:
            samples.append(to_sample(parse_record(where, record), where))
            where_ok.append(i)
        except MalformedRecord as e:
            results[i] = str(e)
    for i, result in zip(where_ok, renderer.encode_batch(samples)):
        results[i] = result
    return results


_worker_renderer: ChatRenderer | None = None


def _init_worker(tokenizer, template_kwargs, chat_template) -> None:
    global _worker_renderer
    # The workers are the parallelism: one thread each rather than the Rust tokenizer's pool too.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_renderer = ChatRenderer(tokenizer, template_kwargs, chat_template)


def _encode_in_worker(batch: list):
    assert _worker_renderer is not None, "worker used before its initializer ran"
    return _encode(_worker_renderer, batch)
