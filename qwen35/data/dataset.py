"""From the run config's `data` section to packed training and validation sets.

    datasets = build_datasets(cfg.data, tokenizer)
    print(datasets.stats.summary())
    loader = PackedLoader(datasets.train, micro_batch_size, seed=cfg.data.seed,
                          rank=rank, world_size=world_size)

The steps, each in its own module: find the files (formats), tokenise each file once into a
memory-mapped store (tokenized, render), apply the overlong policy per source, hold out validation
samples, mix the sources by weight, and pack (pack). All randomness comes from `seed`.

Under torch.distributed every rank calls this. Rank r builds the stores of files r, r + N, ...
while the others wait, then every rank maps every store: the tokens are on disk once and in
memory once per machine (the page cache), and each rank holds only the packing plan. A data error
on any rank is raised on every rank, so the run stops everywhere with the same message.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from qwen35.data.formats import DataError, Source, parse_sources
from qwen35.data.pack import PackCounts, PackedDataset, select_documents
from qwen35.data.tokenized import (TokenizedFile, build_store, is_complete, store_path, tokenize_file,
                                   tokenizer_fingerprint)

# The `data` settings read here, with the defaults used when a config leaves one out.
DATA_DEFAULTS: dict[str, Any] = {
    "train_path": None,  # str or list: see qwen35.data.formats
    "val_path": None,
    "val_fraction": 0.0,
    "seq_len": 2048,
    "overlong": "drop",  # or "truncate"
    "on_malformed": "skip",  # or "error"
    "max_malformed_fraction": 0.5,
    "num_workers": 0,
    "cache_dir": None,
    "chat_template": None,  # a template file to use instead of the tokenizer's
    "template_kwargs": None,  # extra template variables, e.g. {"enable_thinking": False}
    "seed": 42,
    # vision-language runs only (qwen35.data.media, qwen35.data.processor)
    "media_root": None,
    "image_min_pixels": None,
    "image_max_pixels": None,
    "video_fps": None,
    "video_max_frames": None,
    "video_min_pixels": None,
    "video_max_pixels": None,
}


@dataclass
class SourceStats:
    """What one entry of the data spec gave: records read, malformed, and what packing kept."""

    entry: str
    records: int = 0
    malformed: int = 0
    counts: PackCounts = field(default_factory=PackCounts)
    first_problem: str | None = None

    def line(self, seq_len: int) -> str:
        c = self.counts
        text = (f"{self.entry}: {self.records} records read, {self.malformed} malformed, "
                f"{c.dropped_overlong} dropped as longer than seq_len {seq_len}, {c.truncated} "
                f"truncated, {c.dropped_no_loss} dropped with nothing to learn, {c.documents} kept")
        return text + (f" (first problem: {self.first_problem})" if self.first_problem else "")


@dataclass
class DataStats:
    """What reading and packing did, for the trainer to print."""

    files: int = 0
    files_from_cache: int = 0
    records: int = 0
    malformed: int = 0
    problems: list[str] = field(default_factory=list)  # "file:line: reason", the first of each file
    train: PackCounts = field(default_factory=PackCounts)
    val: PackCounts | None = None
    sources: list[SourceStats] = field(default_factory=list)
    seq_len: int = 0

    def summary(self, show: int = 5) -> str:
        lines = [f"data: {self.records} records in {self.files} files "
                 f"({self.files_from_cache} from cache), {self.malformed} malformed"]
        lines += [f"  malformed: {p}" for p in self.problems[:show]]
        if self.malformed > show:
            lines.append(f"  ... and {self.malformed - show} more")
        if len(self.sources) > 1:
            lines += [f"  source {s.line(self.seq_len)}" for s in self.sources]
        for name, c in (("train", self.train), ("val", self.val)):
            if c is not None:
                lines.append(f"{name}: {c.documents} samples, {c.truncated} truncated, "
                             f"{c.dropped_overlong} dropped as too long, {c.dropped_no_loss} "
                             "dropped with nothing to learn")
        return "\n".join(lines)


@dataclass
class Datasets:
    train: PackedDataset
    val: PackedDataset | None
    stats: DataStats


def build_datasets(config: Any, tokenizer, *, template_kwargs: dict | None = None,
                   progress: bool = True) -> Datasets:
    """`config` is the data section (a dataclass or a mapping) with the fields of DATA_DEFAULTS;
    `template_kwargs` go to the chat template on top of the config's (e.g. `{"enable_thinking": False}`)."""
    s = _settings(config)
    _check_settings(s)
    kwargs = {**(s["template_kwargs"] or {}), **(template_kwargs or {})}
    chat_template = _read_template(s["chat_template"])
    train_sources = parse_sources(s["train_path"])
    val_sources = parse_sources(s["val_path"]) if s["val_path"] is not None else []
    if any(src.weight is not None for src in val_sources):
        raise DataError("data.val_path takes no weights: validation uses every sample once")

    paths = list(dict.fromkeys(p.resolve() for src in train_sources + val_sources for p in src.files))
    files, built = _tokenize_files(paths, tokenizer, s, kwargs, chat_template, progress)
    index = {f.path.resolve(): i for i, f in enumerate(files)}
    for f in files:
        _check_malformed_fraction(f, s["max_malformed_fraction"])
    stats = DataStats(files=len(files), files_from_cache=len(files) - built,
                      records=sum(f.records for f in files),
                      malformed=sum(f.malformed for f in files),
                      problems=[p for f in files for p in f.problems], seq_len=s["seq_len"])

    rng = np.random.default_rng(s["seed"])
    train_parts, val_parts = [], []
    for src in train_sources:
        docs = _select(src, files, index, s, stats)
        docs = docs[rng.permutation(len(docs))]
        n_val = _val_count(len(docs), s["val_fraction"])
        val_parts.append(docs[:n_val])
        train_parts.append(docs[n_val:])
    train_docs = _mix(train_parts, train_sources, rng)
    train_sources_stats = list(stats.sources)
    stats.train = _totals(train_sources_stats, len(train_docs))
    if not len(train_docs):
        raise DataError("no training sample is left after reading and packing; per source:\n"
                        + "\n".join(f"  {st.line(s['seq_len'])}" for st in stats.sources))
    if val_sources:
        val_parts = [_select(src, files, index, s, stats) for src in val_sources]
    val_docs = np.concatenate(val_parts) if val_parts else np.zeros((0, 3), np.int64)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = PackedDataset(files, train_docs, s["seq_len"], pad_id, seed=s["seed"])
    val = None
    if len(val_docs):
        stats.val = _totals(stats.sources[len(train_sources_stats):], len(val_docs))
        val = PackedDataset(files, val_docs, s["seq_len"], pad_id, seed=s["seed"])
    return Datasets(train, val, stats)


def _settings(config: Any) -> dict[str, Any]:
    get = config.get if isinstance(config, Mapping) else lambda k, d: getattr(config, k, d)
    return {key: get(key, default) for key, default in DATA_DEFAULTS.items()}


def _check_settings(s: dict[str, Any]) -> None:
    if s["train_path"] is None:
        raise ValueError("data.train_path is not set; for the built-in task, write its files "
                         "with qwen35.data.build_task(directory) and train on their train path")
    if s["val_path"] is not None and s["val_fraction"] > 0:
        raise ValueError("data.val_path and data.val_fraction are exclusive")
    if not 0.0 <= s["val_fraction"] < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {s['val_fraction']}")
    if s["on_malformed"] not in ("skip", "error"):
        raise ValueError(f"data.on_malformed must be 'skip' or 'error', got {s['on_malformed']!r}")
    if not 0.0 <= s["max_malformed_fraction"] <= 1.0:
        raise ValueError(f"data.max_malformed_fraction must be in [0, 1], got {s['max_malformed_fraction']}")
    if s["seq_len"] < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {s['seq_len']}")
    if s["template_kwargs"] is not None and not isinstance(s["template_kwargs"], Mapping):
        raise ValueError(f"data.template_kwargs must be a mapping, got {s['template_kwargs']!r}")


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.chat_template {path}: cannot read it: {e}") from None


def _tokenize_files(paths: list[Path], tokenizer, s: dict, kwargs: dict, chat_template: str | None,
                    progress: bool) -> tuple[list[TokenizedFile], int]:
    """Every file's store, mapped, and how many stores were built by this call (see the module
    docstring for the work split across ranks)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    # A CPU group with a long timeout: the others wait here for as long as tokenising takes (the
    # default group's timeout is minutes, and NCCL's barrier would need a GPU).
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=24)) if world > 1 else None
    cache_dir = s["cache_dir"]
    temporary = cache_dir is None
    if temporary:  # one directory for all ranks of the machine, removed once all have mapped it
        name = [tempfile.mkdtemp(prefix="qwen35-data-") if rank == 0 else None]
        if group is not None:
            dist.broadcast_object_list(name, src=0, group=group)
        cache_dir = name[0]
    fingerprint = tokenizer_fingerprint(tokenizer, kwargs, chat_template)
    options = dict(num_workers=s["num_workers"], on_malformed=s["on_malformed"],
                   template_kwargs=kwargs, chat_template=chat_template)
    built, error = 0, None
    try:
        for i, path in enumerate(paths):
            store = store_path(Path(cache_dir), path, fingerprint)
            if i % world == rank and not is_complete(store):
                build_store(path, store, tokenizer, progress=progress, **options)
                built += 1
    except (DataError, OSError) as e:
        error = e
    if group is not None:  # every rank learns of every error, and waits for every store
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (built, error), group=group)
        built = sum(b for b, _ in gathered)
        error = next((e for _, e in gathered if e is not None), None)
    try:
        if error is not None:
            raise error
        # A store not visible here (another machine's disk) is built here.
        files = [tokenize_file(p, tokenizer, cache_dir=cache_dir, fingerprint=fingerprint,
                               progress=progress, **options) for p in paths]
    finally:
        if group is not None:
            dist.barrier(group=group)  # every rank has mapped the stores (or failed)
            dist.destroy_process_group(group)
        if temporary and rank == 0:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return files, built


def _check_malformed_fraction(file: TokenizedFile, limit: float) -> None:
    if file.records and file.malformed / file.records > limit:
        raise DataError(f"{file.path}: {file.malformed} of {file.records} records are malformed, "
                        f"more than data.max_malformed_fraction ({limit}); is this the right file "
                        f"and format? The first: {file.problems[0]}")


def _select(source: Source, files: list[TokenizedFile], index: dict[Path, int], s: dict,
            stats: DataStats) -> np.ndarray:
    """The source's documents ([n, 3]: file, sample, tokens) after the overlong policy; its counts
    are added to `stats.sources`."""
    docs, counts = select_documents(files, _refs(source, files, index), s["seq_len"], s["overlong"])
    mine = [files[index[p.resolve()]] for p in source.files]
    problems = [p for f in mine for p in f.problems]
    stats.sources.append(SourceStats(source.entry, sum(f.records for f in mine),
                                     sum(f.malformed for f in mine), counts,
                                     problems[0] if problems else None))
    return docs


def _totals(sources: list[SourceStats], documents: int) -> PackCounts:
    return PackCounts(documents=documents, truncated=sum(s.counts.truncated for s in sources),
                      dropped_overlong=sum(s.counts.dropped_overlong for s in sources),
                      dropped_no_loss=sum(s.counts.dropped_no_loss for s in sources))


def _refs(source: Source, files: list[TokenizedFile], index: dict[Path, int]) -> np.ndarray:
    """[n, 2] (file, sample) of every sample of a source."""
    parts = []
    for path in source.files:
        f = index[path.resolve()]
        parts.append(np.stack([np.full(len(files[f]), f), np.arange(len(files[f]))], axis=1))
    return np.concatenate(parts).astype(np.int64)


def _val_count(n: int, fraction: float) -> int:
    """At least one held-out sample when a fraction is asked for, and at least one left to train."""
    if fraction == 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(fraction * n)))


def _mix(parts: list[np.ndarray], sources: list[Source], rng: np.random.Generator) -> np.ndarray:
    """Every sample once without weights; with them, round(w_i * total) samples of source i: whole
    copies of the source, then a random subset for the rest."""
    if not parts:
        return np.zeros((0, 3), np.int64)
    if sources[0].weight is None:
        return np.concatenate(parts)
    total = sum(len(p) for p in parts)
    weights = np.array([src.weight for src in sources], dtype=np.float64)
    shares = weights / weights.sum()
    mixed = []
    for part, share, src in zip(parts, shares, sources):
        want = int(round(share * total))
        if want and not len(part):
            raise DataError(f"data source {src.entry}: it has a weight but no usable sample")
        copies, rest = divmod(want, len(part)) if len(part) else (0, 0)
        mixed += [part] * copies + [part[rng.choice(len(part), rest, replace=False)]]
    return np.concatenate(mixed)
