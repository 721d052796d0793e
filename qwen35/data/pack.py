"""Packing tokenised samples into rows of exactly `seq_len` tokens.

A row holds several whole documents back to back. `position_ids` restart at 0 in each document and
`cu_seqlens` (int32: 0, the document ends, seq_len) tells every token mixer where documents
begin, so nothing attends or carries state across a boundary. What is left at the end of a row is
padding: its own segment, labels all -100.

Why best-fit decreasing: samples are placed longest first, each into the row whose free space is
the smallest that still holds it, and a new row is opened only when none does. Concatenating the
stream and cutting it every seq_len tokens wastes nothing but splits documents, so a chat answer
is trained without its question, or a question without its answer; padding each sample to seq_len
splits nothing but wastes most of the compute on short chats. Best-fit decreasing keeps every
document whole and, because the many short samples fill the gaps the long ones leave, typically
pads well under 1% of a row (it is provably within 11/9 of the fewest rows possible). It needs all
lengths up front, which a tokenised, cached data set has.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from qwen35.data.render import IGNORE_INDEX
from qwen35.data.tokenized import TokenizedFile


@dataclass
class PackCounts:
    documents: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_loss: int = 0  # nothing to learn: no assistant token (left) in the sample


def select_documents(files: list[TokenizedFile], refs: np.ndarray, seq_len: int,
                     overlong: str) -> tuple[np.ndarray, PackCounts]:
    """Applies the overlong policy to `refs` ([n, 2]: file, sample) and drops samples with no loss
    token. Returns documents as [m, 3] (file, sample, tokens to take) and what happened.

    `drop` (the default) leaves out every sample longer than `seq_len`. `truncate` keeps its first
    `seq_len` tokens: a sample whose learned tokens are all cut away (a long prompt) is dropped and
    counted with those that have nothing to learn; a cut answer is trained without its `<|im_end|>`
    on purpose, since appending one would teach the model to stop mid-sentence."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    counts = PackCounts()
    if len(refs) == 0:
        return np.zeros((0, 3), np.int64), counts
    lengths = np.zeros(len(refs), dtype=np.int64)
    losses = np.zeros(len(refs), dtype=np.int64)
    for f, file in enumerate(files):
        mine = refs[:, 0] == f
        lengths[mine] = file.lengths[refs[mine, 1]]
        losses[mine] = file.loss_counts()[refs[mine, 1]]
    too_long = lengths > seq_len
    if overlong == "drop":
        counts.dropped_overlong = int(too_long.sum())
        keep = ~too_long
    else:
        for i in np.flatnonzero(too_long):  # few: only these need their prefix looked at
            f, s = refs[i]
            start = files[f].offsets[s]
            losses[i] = int(files[f].loss[start:start + seq_len].sum())
        counts.truncated = int((too_long & (losses > 0)).sum())
        lengths = np.minimum(lengths, seq_len)
        keep = np.ones(len(refs), dtype=bool)
    counts.dropped_no_loss = int((keep & (losses == 0)).sum())
    keep &= losses > 0
    docs = np.concatenate([refs[keep], lengths[keep, None]], axis=1)
    counts.documents = len(docs)
    return docs, counts


def best_fit_decreasing(lengths: np.ndarray, seq_len: int, seed: int) -> list[list[int]]:
    """Rows of indices into `lengths` (each ≤ seq_len), each row's lengths summing to ≤ seq_len.

    Equal lengths are taken in a seeded random order, so the result depends on the seed alone.
    Free space is looked up by bisection over the distinct free sizes (at most seq_len of them),
    which keeps packing a million samples to seconds.
    """
    assert len(lengths) == 0 or lengths.max() <= seq_len, "overlong samples must be cut first"
    shuffled = np.random.default_rng(seed).permutation(len(lengths))
    order = shuffled[np.argsort(-lengths[shuffled], kind="stable")]
    rows: list[list[int]] = []
    free_sizes: list[int] = []  # sorted, distinct
    rows_by_free: dict[int, list[int]] = {}
    for i in order:
        need = int(lengths[i])
        j = bisect.bisect_left(free_sizes, need)
        if j < len(free_sizes):
            free = free_sizes[j]
            row = rows_by_free[free].pop()
            if not rows_by_free[free]:
                del rows_by_free[free]
                free_sizes.pop(j)
        else:
            free, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(int(i))
        left = free - need
        if left > 0:
            if left not in rows_by_free:
                bisect.insort(free_sizes, left)
                rows_by_free[left] = []
            rows_by_free[left].append(row)
    return rows


class PackedDataset(torch.utils.data.Dataset):
    """Rows of `seq_len` tokens, built on demand from the tokenised files: nothing is copied up
    front; what stays in memory is the packing plan (a few integers per document)."""

    def __init__(self, files: list[TokenizedFile], docs: np.ndarray, seq_len: int, pad_id: int,
                 seed: int = 0):
        self.files, self.docs, self.seq_len, self.pad_id = files, docs, seq_len, pad_id
        rows = best_fit_decreasing(docs[:, 2], seq_len, seed) if len(docs) else []
        rows = [rows[i] for i in np.random.default_rng(seed + 1).permutation(len(rows))]
        self.row_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        self.row_docs = np.array([d for r in rows for d in r], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.docs[:, 2].sum()) if len(self.docs) else 0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_tokens / max(1, len(self) * self.seq_len)

    def documents(self, row: int) -> np.ndarray:
        """[k, 3] (file, sample, length) of the documents in `row`, in order."""
        return self.docs[self.row_docs[self.row_offsets[row]:self.row_offsets[row + 1]]]

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of {len(self)}")
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(self.seq_len, dtype=np.int64)
        bounds = [0]
        for f, s, n in self.documents(row):
            file, t = self.files[f], bounds[-1]
            start = file.offsets[s]
            ids[t:t + n] = file.ids[start:start + n]
            labels[t:t + n] = np.where(file.loss[start:start + n], ids[t:t + n], IGNORE_INDEX)
            positions[t:t + n] = np.arange(n)
            bounds.append(t + n)
        if bounds[-1] < self.seq_len:  # the padding segment
            positions[bounds[-1]:] = np.arange(self.seq_len - bounds[-1])
            bounds.append(self.seq_len)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions),
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        }


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows → ONE flattened packed row: `input_ids`, `labels`, `position_ids` as [1, total] and
    `cu_seqlens` int32 [documents + 1], the rows' boundaries shifted by each row's start. The model
    runs packed rows with batch size 1, so a micro-batch of n rows is one row n times as long."""
    if not rows:
        raise ValueError("collate needs at least one row")
    bounds, start = [rows[0]["cu_seqlens"][:1]], 0
    for row in rows:
        bounds.append(row["cu_seqlens"][1:] + start)
        start += row["input_ids"].numel()
    return {
        "input_ids": torch.cat([r["input_ids"] for r in rows])[None],
        "labels": torch.cat([r["labels"] for r in rows])[None],
        "position_ids": torch.cat([r["position_ids"] for r in rows])[None],
        "cu_seqlens": torch.cat(bounds).to(torch.int32),
    }
