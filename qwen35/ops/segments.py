"""Packed rows: helpers around `cu_seqlens`, the document boundaries of a flattened row.

`cu_seqlens` is int32 `[N + 1]`: 0, the cumulative document lengths, the row length. It is never
modified in place (fla caches per tensor identity).
"""

from __future__ import annotations

import torch


def split_documents(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def positions_in_documents(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Each token's index within its document, `[length]` (0 at every document start)."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    doc_start = torch.repeat_interleave(starts, lengths, output_size=length)
    return torch.arange(length, device=cu_seqlens.device) - doc_start


def document_starts(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Bool `[length]`: True where a document begins."""
    return positions_in_documents(cu_seqlens, length) == 0


def pad_documents(x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A packed row `[1, T, ...]` as a zero-padded batch `[N, longest, ...]`, one document per
    row, and the (document, position) index of every token to gather the result back.

    The reference kernels run many short documents this way in one batched call instead of a
    Python loop over documents; the padding sits after each document's end, where causal
    operations never look.
    """
    length = x.shape[1]
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    document = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts, output_size=length)
    position = positions_in_documents(cu_seqlens, length)
    padded = x.new_zeros(len(counts), int(counts.max()), *x.shape[2:])
    padded[document, position] = x[0]
    return padded, (document, position)


def unpad_documents(padded: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The inverse of `pad_documents`: back to one packed row `[1, T, ...]`."""
    return padded[index][None]
