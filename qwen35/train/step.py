"""One optimizer step's forward and backward over its micro-batches.

The loss is the sum of token losses divided by the number of loss tokens in the whole step (all
micro-batches, and all ranks once `global_count` all-reduces it; under sequence parallelism the
`ranks_per_row` ranks that share a row each count its tokens, so the sum is divided by that). Per-micro-batch
means would weigh a token of a short micro-batch more than one of a long micro-batch: the
"gradient accumulation bug".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qwen35.model.model import IGNORE_INDEX, next_token_targets


def count_loss_tokens(batch: dict) -> torch.Tensor:
    targets = next_token_targets(batch["labels"], batch.get("cu_seqlens"))
    return (targets != IGNORE_INDEX).sum()


@dataclass
class StepResult:
    loss: torch.Tensor  # the step's mean token loss over every rank
    loss_tokens: torch.Tensor  # loss tokens of the step over every rank
    router: dict[str, torch.Tensor] | None = None  # MoE: aux_loss, z_loss (step means), tokens_per_expert [L, E]


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[dict],
    global_count: Callable[[torch.Tensor], torch.Tensor] = lambda n: n,
    autocast_dtype: torch.dtype | None = None,
    router_z_loss_coef: float = 0.0,
    gradient_ranks: int = 1,
    ranks_per_row: int = 1,
) -> StepResult:
    """Accumulates the gradient of (step loss sum / step loss tokens), plus for MoE models the
    router losses (per-micro-batch means, averaged over the step's micro-batches on every rank).

    FSDP averages the gradients of its `gradient_ranks` ranks (all of them, data- and
    sequence-parallel); each rank's backward therefore runs on its share of the step's loss times
    `gradient_ranks`, so that the average is the whole step's gradient, exactly what one process
    computes (and what clipping and the logged grad norm see). Under sequence parallelism
    `loss_sum` is the rank's own tokens' and the batches are whole rows; see docs/parallel.md."""
    rows_count = global_count(sum(count_loss_tokens(b) for b in micro_batches))
    count = (rows_count // ranks_per_row).clamp(min=1)
    total = torch.zeros((), device=count.device)
    router = None
    for batch in micro_batches:
        device_type = batch["input_ids"].device.type
        autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            out = model(batch["input_ids"], batch.get("position_ids"), batch.get("cu_seqlens"), labels=batch["labels"])
        loss = out.loss_sum / count * gradient_ranks
        if out.router is not None:
            aux, z = out.router.aux_loss / len(micro_batches), out.router.z_loss / len(micro_batches)
            loss = loss + model.config.router_aux_loss_coef * aux + router_z_loss_coef * z
            this = {"aux_loss": aux.detach(), "z_loss": z.detach(), "tokens_per_expert": out.router.tokens_per_expert}
            router = this if router is None else {k: router[k] + v for k, v in this.items()}
        loss.backward()
        total = total + out.loss_sum.detach()
    return StepResult(global_count(total) / count, count, router)
