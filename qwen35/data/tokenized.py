"""Tokenising whole data files: in parallel, with a progress bar, cached on disk.

A file's tokens are stored flat: `ids` (int32) and `loss` (bool) for all samples end to end, and
`offsets` (int64, n + 1) where each sample starts. That is ~5 bytes a token, loads in one read,
and a sample is two slices. The cache file's name carries a hash of everything that decides its
content: the data file (path, size, modification time), the tokenizer (its full tokenizer.json,
special tokens and chat template), the chat-template arguments and the encoder's version. Change
any of these and the file is tokenised again; change none and a run starts at once. Packing
settings (seq_len, overlong, weights, split) are not part of it: packing is fast and reruns.

Malformed records are kept in the cache as their messages, so a cached run reports (or, with
`on_malformed="error"`, stops on) the same records as the run that built it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen35.data.formats import MalformedRecord, Sample, read_file
from qwen35.data.render import ChatRenderer

# Bump when the encoding of a sample changes, so that old caches are not read.
ENCODER_VERSION = 1
# Below this many samples worker start-up (each imports transformers) costs more than it saves.
MIN_SAMPLES_FOR_WORKERS = 2000


@dataclass
class TokenizedFile:
    path: Path
    ids: np.ndarray  # int32 [tokens]
    loss: np.ndarray  # bool [tokens]
    offsets: np.ndarray  # int64 [samples + 1]
    records: int  # records read, usable or not
    problems: list[str]  # "where: reason" of each malformed record
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def loss_counts(self) -> np.ndarray:
        counts = np.concatenate([[0], np.cumsum(self.loss, dtype=np.int64)])
        return counts[self.offsets[1:]] - counts[self.offsets[:-1]]


def tokenizer_fingerprint(tokenizer, template_kwargs: dict | None = None) -> str:
    parts = [
        tokenizer.backend_tokenizer.to_str(),
        str(tokenizer.chat_template),
        json.dumps([tokenizer.eos_token, tokenizer.pad_token], default=str),
        json.dumps(template_kwargs or {}, sort_keys=True, default=str),
        str(ENCODER_VERSION),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_path(cache_dir: Path, path: Path, fingerprint: str) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{fingerprint}"
    return cache_dir / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def tokenize_file(path: Path, tokenizer, *, num_workers: int = 0, cache_dir: str | Path | None = None,
                  on_malformed: str = "skip", template_kwargs: dict | None = None,
                  fingerprint: str | None = None, progress: bool = True) -> TokenizedFile:
    """All usable samples of one data file as tokens, from the cache when it has them."""
    cached = None
    if cache_dir is not None:
        fingerprint = fingerprint or tokenizer_fingerprint(tokenizer, template_kwargs)
        cached = cache_path(Path(cache_dir), path, fingerprint)
        if cached.is_file():
            result = _load(cached, path)
            _check_malformed(result.problems, on_malformed)
            return result
    read = read_file(path, on_malformed)
    encoded, problems = _encode_all(read.samples, tokenizer, template_kwargs, num_workers,
                                    on_malformed, progress, desc=f"tokenising {path.name}")
    lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
    result = TokenizedFile(
        path=path,
        ids=np.concatenate([ids for ids, _ in encoded]) if encoded else np.zeros(0, np.int32),
        loss=np.concatenate([m for _, m in encoded]) if encoded else np.zeros(0, bool),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        records=read.records,
        problems=read.problems + problems,
    )
    if cached is not None:
        _save(cached, result)
    return result


def _check_malformed(problems: list[str], on_malformed: str) -> None:
    if problems and on_malformed == "error":
        raise MalformedRecord(problems[0])


def _encode_all(samples: list[Sample], tokenizer, template_kwargs, num_workers: int,
                on_malformed: str, progress: bool, desc: str):
    encoded, problems = [], []
    bar = tqdm(total=len(samples), desc=desc, unit="sample", disable=not progress)
    if num_workers > 0 and len(samples) >= MIN_SAMPLES_FOR_WORKERS:
        # fork where there is one: spawn re-runs the caller's main module in every worker, which
        # fails for notebooks and `python -` and costs a transformers import per worker. The
        # workers use only the tokenizer, never torch, so torch's threads in the parent are safe.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with context.Pool(num_workers, _init_worker, (tokenizer, template_kwargs)) as pool:
            results = pool.imap(_encode_in_worker, samples, chunksize=64)
            _collect(results, encoded, problems, on_malformed, bar)
    else:
        renderer = ChatRenderer(tokenizer, template_kwargs)
        _collect(map(lambda s: _try_encode(renderer, s), samples), encoded, problems,
                 on_malformed, bar)
    bar.close()
    return encoded, problems


def _collect(results, encoded: list, problems: list, on_malformed: str, bar) -> None:
    for result in results:
        if isinstance(result, str):
            if on_malformed == "error":
                raise MalformedRecord(result)
            problems.append(result)
        else:
            encoded.append(result)
        bar.update()


def _try_encode(renderer: ChatRenderer, sample: Sample):
    """The encoded sample, or the problem's message (exceptions do not cross processes well)."""
    try:
        return renderer.encode(sample)
    except MalformedRecord as e:
        return str(e)


_worker_renderer: ChatRenderer | None = None


def _init_worker(tokenizer, template_kwargs) -> None:
    global _worker_renderer
    _worker_renderer = ChatRenderer(tokenizer, template_kwargs)


def _encode_in_worker(sample: Sample):
    assert _worker_renderer is not None, "worker used before its initializer ran"
    return _try_encode(_worker_renderer, sample)


def _save(target: Path, result: TokenizedFile) -> None:
    """Written under a temporary name, then renamed: a reader never sees half a file, and two
    ranks building the same cache at once both end with a whole one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, ids=result.ids, loss=result.loss, offsets=result.offsets,
                 meta=np.array(json.dumps({"records": result.records, "problems": result.problems})))
    os.replace(tmp, target)


def _load(cached: Path, path: Path) -> TokenizedFile:
    with np.load(cached) as z:
        meta = json.loads(str(z["meta"]))
        return TokenizedFile(path=path, ids=z["ids"], loss=z["loss"], offsets=z["offsets"],
                             records=meta["records"], problems=meta["problems"], from_cache=True)
