"""AdamW and the learning-rate schedule.

Parameters are float32 (the master weights); compute runs in bf16 under autocast on GPU. Norm
weights, biases and the GDN decay parameters (every parameter with fewer than two dimensions)
get no weight decay, as in transformers' Trainer: decaying `A_log` toward 0 would pull every
head's decay rate toward exp(0) = 1 regardless of the data.
"""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas, eps: float) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then the schedule's decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"optim.scheduler must be cosine, linear or constant, not {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, schedule, min_ratio)
    )
