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
