"""One optimizer step's forward and backward over its micro-batches.

The loss is the sum of token losses divided by the number of loss tokens in the whole step (all
micro-batches, and all data-parallel ranks once `global_count` all-reduces it). Per-micro-batch
means would weigh a token of a short micro-batch more than one of a long micro-batch: the
"gradient accumulation bug".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from qwen35.model.model import IGNORE_INDEX, next_token_targets


def count_loss_tokens(batch: dict) -> torch.Tensor:
    targets = next_token_targets(batch["labels"], batch.get("cu_seqlens"))
    return (targets != IGNORE_INDEX).sum()


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[dict],
    global_count: Callable[[torch.Tensor], torch.Tensor] = lambda n: n,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulates the gradient of (step loss sum / step loss tokens). Returns (loss, tokens)."""
    count = global_count(sum(count_loss_tokens(b) for b in micro_batches)).clamp(min=1)
    total = torch.zeros((), device=count.device)
    for batch in micro_batches:
        device_type = batch["input_ids"].device.type
        autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            out = model(batch["input_ids"], batch.get("position_ids"), batch.get("cu_seqlens"), labels=batch["labels"])
        loss = out.loss_sum / count
        if out.aux_loss is not None:  # MoE load balancing: a per-micro-batch mean, averaged over the step
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss / len(micro_batches)
        loss.backward()
        total = total + out.loss_sum.detach()
    return global_count(total) / count, count
