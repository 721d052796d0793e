"""Cross-entropy of `hidden @ weight.T` against targets, in chunks of tokens.

A 248,320-word vocabulary makes full logits the largest tensor of a step (8k tokens of fp32
logits are 8 GB). Each chunk's logits are computed, reduced to a loss, and dropped; the backward
recomputes them chunk by chunk (activation checkpointing per chunk), so at most one chunk of
logits is alive at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy(hidden_ND, weight_VD, targets_N, chunk_size: int = 4096) -> torch.Tensor:
    """Summed token loss (targets == -100 count nothing). Equal to plain cross-entropy.

    Only the positions with a target go through the head: in supervised fine-tuning most
    positions are prompt (nine in ten on the built-in task), which then cost nothing. With no
    target at all the result is a zero that still reaches `hidden` and `weight`, so a backward
    runs (every rank of a data-parallel step must run one)."""
    keep = targets_N != IGNORE_INDEX
    if not keep.any():
        return (hidden_ND[:0] @ weight_VD.T).float().sum()
    hidden_ND, targets_N = hidden_ND[keep], targets_N[keep]
    total = hidden_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_ND.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(
            _chunk_loss, hidden_ND[start:end], weight_VD, targets_N[start:end], use_reentrant=False
        )
    return total
