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

from qwen35.model.model import next_token_targets
from qwen35.model.moe import RouterStats, balance_loss
from qwen35.ops.cross_entropy import IGNORE_INDEX


MODEL_INPUTS = ("input_ids", "position_ids", "cu_seqlens", "pixel_values", "image_grid_thw")


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of the model's forward that `batch` holds: a text row's, or an
    image-text row's with its images (`qwen35.data.media.collate_media`)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def count_loss_tokens(batch: dict) -> torch.Tensor:
    targets = next_token_targets(batch["labels"], batch.get("cu_seqlens"))
    return (targets != IGNORE_INDEX).sum()


@dataclass
class StepResult:
    loss: torch.Tensor  # the step's mean token loss over every rank
    loss_tokens: torch.Tensor  # loss tokens of the step over every rank
    # MoE: aux_loss and z_loss as this rank's share of the step's values (summed over ranks they
    # are the step's router losses), tokens_per_expert [L, E] this rank's assignments.
    router: dict[str, torch.Tensor] | None = None


def router_losses(stats: RouterStats, step_assigned: torch.Tensor | None, step_rows, num_micro: int,
                  data_parallel_size: int):
    """This rank's share of one micro-batch's (aux, z) router losses; the step's losses are the
    sum of the shares over micro-batches and ranks.

    Without step statistics (`micro_batch`, transformers' form): each rank's micro-batch is
    balanced on its own; the step's losses are the mean over micro-batches and ranks.
    With them (`global`): f_e, the fraction of the step's assignments that went to expert e over
    every micro-batch, rank and layer, carries no gradient, so the step's balance loss
    `E * sum_e f_e * P_e / rows` is linear in the probability sums P_e, and this micro-batch's
    share is the same expression over its own sums: the shares add up to the step's loss and
    each backward carries exactly its part of the gradient."""
    if step_assigned is None:
        share = num_micro * data_parallel_size
        return stats.aux_loss / share, stats.z_loss / share
    return balance_loss(step_assigned, stats.prob_sum, step_rows), stats.z_sum / step_rows


@torch.no_grad()
def step_assignments(model, micro_batches: Sequence[dict], autocast, global_sum) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's top-k assignments per expert [E] and routed rows (tokens x MoE layers), over
    every micro-batch and rank: a forward without gradient, since a layer's routing depends on
    every layer below it. The training forward then routes the same way (same weights, same
    inputs); f_e carries no gradient, so this pass only has to count."""
    stats = []
    for batch in micro_batches:
        with autocast():
            router = model(**model_inputs(batch), labels=batch["labels"]).router
        stats.append(torch.cat([router.tokens_per_expert.sum(0), router.prob_sum.new_tensor([router.rows])]))
    summed = global_sum(torch.stack(stats).sum(0))
    return summed[:-1], summed[-1]


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[dict],
    global_count: Callable[[torch.Tensor], torch.Tensor] = lambda n: n,
    autocast_dtype: torch.dtype | None = None,
    router_z_loss_coef: float = 0.0,
    data_parallel_size: int = 1,
    router_balance: str = "micro_batch",
    ranks_per_row: int = 1,
) -> StepResult:
    """Accumulates the gradient of (step loss sum / step loss tokens), plus for MoE models the
    router losses (`router_losses`): per micro-batch (`micro_batch`) or over the whole step
    (`global`, after a counting forward, `step_assignments`).

    FSDP averages the gradients of its `data_parallel_size` ranks (all of them, data- and
    sequence-parallel); each rank's backward therefore runs on its share of the step's loss times
    that number, so that the average is the whole step's gradient, exactly what one process
    computes (and what clipping and the logged grad norm see). `global_count` sums a tensor over
    all ranks; under sequence parallelism `ranks_per_row` ranks share each row and each counts its
    loss tokens, and `loss_sum` is the rank's own tokens' (docs/parallel.md)."""
    rows_count = global_count(sum(count_loss_tokens(b) for b in micro_batches))
    count = (rows_count // ranks_per_row).clamp(min=1)
    total = torch.zeros((), device=count.device)
    device_type = micro_batches[0]["input_ids"].device.type

    def autocast():
        return torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    step_assigned = step_rows = None
    if router_balance == "global" and model.config.num_experts:
        step_assigned, step_rows = step_assignments(model, micro_batches, autocast, global_count)
    router = None
    for batch in micro_batches:
        with autocast():
            out = model(**model_inputs(batch), labels=batch["labels"])
        loss = out.loss_sum / count
        if out.router is not None:
            aux, z = router_losses(out.router, step_assigned, step_rows, len(micro_batches), data_parallel_size)
            loss = loss + model.config.router_aux_loss_coef * aux + router_z_loss_coef * z
            this = {"aux_loss": aux.detach(), "z_loss": z.detach(), "tokens_per_expert": out.router.tokens_per_expert}
            router = this if router is None else {k: router[k] + v for k, v in this.items()}
        (loss * data_parallel_size).backward()
        total = total + out.loss_sum.detach()
    return StepResult(global_count(total) / count, count, router)
