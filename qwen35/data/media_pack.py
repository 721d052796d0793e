"""From the `data` section to packed image- and video-text rows: the vision-language counterpart of
`dataset.build_datasets`.

The same rules as for text where they carry over: every source read with its malformed records
counted (file and line) or fatal, documents longer than `seq_len` dropped and counted (a
document is never cut: an image or video cut in half has no grid), validation held out per source, sources
mixed by weight (`dataset._mix`), best-fit-decreasing packing (`pack.best_fit_decreasing`). What
differs: the documents stay in memory as token ids and image paths (no memory-mapped store; the
pixels are what is large, and they are read per row), and a row carries its images and videos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen35.data.dataset import DataStats, Datasets, SourceStats, _mix, _settings, _val_count
from qwen35.data.formats import DataError, MalformedRecord, iter_records, parse_record, parse_sources
from qwen35.data.media import MediaDocument, MediaEncoder, media_row
from qwen35.data.pack import PackCounts, best_fit_decreasing
from qwen35.data.render import ChatRenderer


class MediaPackedDataset(torch.utils.data.Dataset):
    """Rows of `seq_len` tokens of whole documents; a row's images and videos are decoded when it
    is read."""

    def __init__(self, docs: list[MediaDocument], seq_len: int, pad_id: int, image_processor,
                 image_token_id: int, seed: int = 0, video_processor=None, video_token_id: int = -1):
        self.docs, self.seq_len, self.pad_id = docs, seq_len, pad_id
        self.image_processor, self.image_token_id = image_processor, image_token_id
        self.video_processor, self.video_token_id = video_processor, video_token_id
        lengths = np.array([len(d.ids) for d in docs], dtype=np.int64)
        rows = best_fit_decreasing(lengths, seq_len, seed) if len(docs) else []
        self.rows = [rows[i] for i in np.random.default_rng(seed + 1).permutation(len(rows))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        return media_row([self.docs[i] for i in self.rows[row]], self.seq_len, self.pad_id,
                         self.image_processor, self.image_token_id, self.video_processor, self.video_token_id)


def build_media_datasets(config: Any, tokenizer, image_processor, video_processor=None) -> Datasets:
    """`config` is the data section; `image_processor` and `video_processor` the ones
    `qwen35.data.processor` loads (no video processor: data with videos is refused)."""
    s = _settings(config)
    if s["train_path"] is None:
        raise ValueError("data.train_path is not set")
    if s["val_path"] is not None and s["val_fraction"] > 0:
        raise ValueError("data.val_path and data.val_fraction are exclusive")
    chat_template = Path(s["chat_template"]).expanduser().read_text() if s["chat_template"] else None
    renderer = ChatRenderer(tokenizer, s["template_kwargs"], chat_template)
    encoder = MediaEncoder(renderer, image_processor, s["media_root"], video_processor)
    stats = DataStats(seq_len=s["seq_len"])
    rng = np.random.default_rng(s["seed"])
    train_sources = parse_sources(s["train_path"])
    train_parts, val_parts = [], []
    for src in train_sources:
        docs = _read_source(src, encoder, s, stats)
        docs = [docs[i] for i in rng.permutation(len(docs))]
        n_val = _val_count(len(docs), s["val_fraction"])
        val_parts.append(docs[:n_val])
        train_parts.append(docs[n_val:])
    # `_mix` picks rows of index arrays; the documents are looked up by index afterwards
    offsets = np.cumsum([0] + [len(p) for p in train_parts])
    mixed = _mix([np.arange(o, o + len(p))[:, None] for o, p in zip(offsets, train_parts)], train_sources, rng)
    every = [d for p in train_parts for d in p]
    train_docs = [every[int(i)] for i in mixed[:, 0]]
    stats.train = PackCounts(documents=len(train_docs),
                             dropped_overlong=sum(x.counts.dropped_overlong for x in stats.sources))
    if not train_docs:
        raise DataError("no training sample is left after reading; per source:\n"
                        + "\n".join(f"  {x.line(s['seq_len'])}" for x in stats.sources))
    if s["val_path"] is not None:
        val_parts = [_read_source(src, encoder, s, stats) for src in parse_sources(s["val_path"])]
    val_docs = [d for p in val_parts for d in p]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    image_token_id = encoder.pad_id

    def dataset(docs):
        return MediaPackedDataset(docs, s["seq_len"], pad_id, image_processor, image_token_id, s["seed"],
                                  video_processor, encoder.video_pad_id)

    val = None
    if val_docs:
        stats.val = PackCounts(documents=len(val_docs))
        val = dataset(val_docs)
    return Datasets(dataset(train_docs), val, stats)


def _read_source(src, encoder: MediaEncoder, s: dict, stats: DataStats) -> list[MediaDocument]:
    """Every usable document of a source; malformed ones counted in `stats` (or raised)."""
    source = SourceStats(src.entry)
    docs = []
    for path in src.files:
        records = malformed = 0
        for where, raw in iter_records(path):
            records += 1
            try:
                doc = encoder.encode(parse_record(where, raw), where, path)
            except MalformedRecord as e:
                if s["on_malformed"] == "error":
                    raise
                malformed += 1
                stats.problems.append(str(e))
                source.first_problem = source.first_problem or str(e)
                continue
            if not doc.loss.any():
                source.counts.dropped_no_loss += 1
            elif len(doc.ids) > s["seq_len"]:
                source.counts.dropped_overlong += 1
            else:
                docs.append(doc)
        if records and malformed / records > s["max_malformed_fraction"]:
            raise DataError(f"{path}: {malformed} of {records} records are malformed, more than "
                            f"data.max_malformed_fraction ({s['max_malformed_fraction']}); the first: "
                            f"{stats.problems[-malformed]}")
        source.records += records
        source.malformed += malformed
        stats.files += 1
    source.counts.documents = len(docs)
    stats.records += source.records
    stats.malformed += source.malformed
    stats.sources.append(source)
    return docs

