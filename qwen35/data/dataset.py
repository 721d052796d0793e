"""From the run config's `data` section to packed training and validation sets.

    datasets = build_datasets(cfg.data, tokenizer)
    print(datasets.stats.summary())
    loader = PackedLoader(datasets.train, micro_batch_size, seed=cfg.data.seed,
                          rank=rank, world_size=world_size)

The steps, each in its own module: find the files (formats), tokenise each file once, in parallel
and cached (tokenized, render), hold out validation samples, mix the sources by weight, apply the
overlong policy and pack (pack). All randomness comes from `seed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen35.data.formats import Source, parse_sources
from qwen35.data.pack import PackCounts, PackedDataset, select_documents
from qwen35.data.tokenized import TokenizedFile, tokenize_file, tokenizer_fingerprint

# The `data` settings read here, with the defaults used when a config leaves one out.
DATA_DEFAULTS: dict[str, Any] = {
    "train_path": None,  # str or list: see qwen35.data.formats
    "val_path": None,
    "val_fraction": 0.0,
    "seq_len": 2048,
    "overlong": "truncate",  # or "drop"
    "on_malformed": "skip",  # or "error"
    "num_workers": 0,
    "cache_dir": None,
    "seed": 42,
}


@dataclass
class DataStats:
    """What reading and packing did, for the trainer to print."""

    files: int = 0
    files_from_cache: int = 0
    records: int = 0
    malformed: int = 0
    problems: list[str] = field(default_factory=list)  # "file:line: reason", all of them
    train: PackCounts = field(default_factory=PackCounts)
    val: PackCounts | None = None

    def summary(self, show: int = 5) -> str:
        lines = [f"data: {self.records} records in {self.files} files "
                 f"({self.files_from_cache} from cache), {self.malformed} malformed"]
        lines += [f"  malformed: {p}" for p in self.problems[:show]]
        if self.malformed > show:
            lines.append(f"  ... and {self.malformed - show} more")
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
    `template_kwargs` go to the chat template (e.g. `{"enable_thinking": False}`)."""
    s = _settings(config)
    if s["train_path"] is None:
        raise ValueError("data.train_path is not set; for the built-in task, write its files "
                         "with qwen35.data.build_task(directory) and train on their train path")
    if s["val_path"] is not None and s["val_fraction"] > 0:
        raise ValueError("data.val_path and data.val_fraction are exclusive")
    if not 0.0 <= s["val_fraction"] < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {s['val_fraction']}")
    if s["on_malformed"] not in ("skip", "error"):
        raise ValueError(f"data.on_malformed must be 'skip' or 'error', got {s['on_malformed']!r}")
    if s["seq_len"] < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {s['seq_len']}")
    train_sources = parse_sources(s["train_path"])
    val_sources = parse_sources(s["val_path"]) if s["val_path"] is not None else []
    if any(src.weight is not None for src in val_sources):
        raise ValueError("data.val_path takes no weights: validation uses every sample once")

    files = _tokenize_sources(train_sources + val_sources, tokenizer, s, template_kwargs, progress)
    index = {f.path: i for i, f in enumerate(files)}
    stats = DataStats(files=len(files), files_from_cache=sum(f.from_cache for f in files),
                      records=sum(f.records for f in files),
                      malformed=sum(len(f.problems) for f in files),
                      problems=[p for f in files for p in f.problems])

    rng = np.random.default_rng(s["seed"])
    train_parts, val_parts = [], []
    for src in train_sources:
        refs = _refs(src, files, index)
        refs = refs[rng.permutation(len(refs))]
        n_val = _val_count(len(refs), s["val_fraction"])
        val_parts.append(refs[:n_val])
        train_parts.append(refs[n_val:])
    train_refs = _mix(train_parts, [src.weight for src in train_sources], rng)
    if val_sources:
        val_parts = [_refs(src, files, index) for src in val_sources]
    val_refs = np.concatenate(val_parts) if val_parts else np.zeros((0, 2), np.int64)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_docs, stats.train = select_documents(files, train_refs, s["seq_len"], s["overlong"])
    train = PackedDataset(files, train_docs, s["seq_len"], pad_id, seed=s["seed"])
    val = None
    if len(val_refs):
        val_docs, stats.val = select_documents(files, val_refs, s["seq_len"], s["overlong"])
        val = PackedDataset(files, val_docs, s["seq_len"], pad_id, seed=s["seed"])
    return Datasets(train, val, stats)


def _settings(config: Any) -> dict[str, Any]:
    get = config.get if isinstance(config, Mapping) else lambda k, d: getattr(config, k, d)
    return {key: get(key, default) for key, default in DATA_DEFAULTS.items()}


def _tokenize_sources(sources: list[Source], tokenizer, s: dict, template_kwargs,
                      progress: bool) -> list[TokenizedFile]:
    """Each distinct file once, however many sources name it."""
    paths = list(dict.fromkeys(p.resolve() for src in sources for p in src.files))
    fingerprint = tokenizer_fingerprint(tokenizer, template_kwargs) if s["cache_dir"] else None
    return [tokenize_file(p, tokenizer, num_workers=s["num_workers"], cache_dir=s["cache_dir"],
                          on_malformed=s["on_malformed"], template_kwargs=template_kwargs,
                          fingerprint=fingerprint, progress=progress)
            for p in paths]


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


def _mix(parts: list[np.ndarray], weights: list[float | None], rng: np.random.Generator) -> np.ndarray:
    """Every sample once without weights; with them, round(w_i * total) samples of source i: whole
    copies of the source, then a random subset for the rest."""
    if not parts:
        return np.zeros((0, 2), np.int64)
    if weights[0] is None:
        return np.concatenate(parts)
    total = sum(len(p) for p in parts)
    shares = np.array(weights, dtype=np.float64) / sum(weights)
    mixed = []
    for part, share in zip(parts, shares):
        want = int(round(share * total))
        if want and not len(part):
            raise ValueError("a weighted data source has no usable sample")
        copies, rest = divmod(want, len(part)) if len(part) else (0, 0)
        mixed += [part] * copies + [part[rng.choice(len(part), rest, replace=False)]]
    return np.concatenate(mixed)
