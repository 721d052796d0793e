"""AdamW and the learning-rate schedule.

By default parameters are float32 (the master weights) and compute runs in bf16 under autocast on
GPU. `optim.weights` and `optim.name` trade that for memory (bytes per trained weight: weight,
gradient, moments, and the compensation where there is one):

| optim.weights | optim.name adamw | optim.name adamw8bit |
|---|---|---|
| float32 (masters) | 4 + 4 + 8 = 16 | 4 + 4 + 2 = 10 (bitsandbytes' AdamW8bit) |
| bf16_kahan | 2 + 2 + 8 + 2 = 14 (`KahanAdamW`) | 2 + 2 + 2 + 2 = 8 (`KahanAdamW`, 8-bit moments) |
| bf16 (rounded each step) | 2 + 2 + 4 = 8 (bf16 moments) | 2 + 2 + 2 = 6 |

`optim.in_backward` (float32 masters, adamw): each weight is updated inside the backward pass as
soon as its gradient is complete, and that gradient freed (`AdamWInBackward`): 4 + 8 = 12 bytes
per weight, the float32 AdamW of the default exactly, but no clipping by the global norm and one
micro-batch per step.

`optim.cpu_offload` (float32 masters, adamw) keeps masters and moments in CPU memory
(`qwen35.train.offload.OffloadedAdamW`): 2 + 2 bytes per bf16 weight on the GPU; with
`optim.in_backward` the CPU update runs during the backward.

Norm weights, biases and the GDN decay parameters (every parameter with fewer than two
dimensions) get no weight decay, as in transformers' Trainer: decaying `A_log` toward 0 would pull
every head's decay rate toward exp(0) = 1 regardless of the data.
"""

from __future__ import annotations

import math

import torch

from qwen35.train.kahan import KahanAdamW
from qwen35.train.offload import OffloadedAdamW, hook_while_alive

OPTIMIZERS = ("adamw", "adamw8bit")
WEIGHTS = ("float32", "bf16_kahan", "bf16")


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas, eps: float,
                    cpu_offload: bool = False, name: str = "adamw", weights: str = "float32",
                    in_backward: bool = False) -> torch.optim.Optimizer:
    """The optimizer of `optim.name` for the model's trainable parameters; `weights` says how the
    model holds them (`build.parameter_dtype` made them bf16 unless float32)."""
    if name not in OPTIMIZERS or weights not in WEIGHTS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS} and optim.weights one of {WEIGHTS}, "
                         f"not {name!r} and {weights!r}")
    if in_backward and (name, weights) != ("adamw", "float32"):
        raise ValueError("optim.in_backward is float32 AdamW: optim.name adamw, optim.weights float32")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    settings = dict(lr=lr, betas=tuple(betas), eps=eps)
    if cpu_offload:
        return OffloadedAdamW(groups, **settings, in_backward=in_backward)
    if in_backward:
        return AdamWInBackward(groups, **settings)
    if weights == "bf16_kahan":
        return KahanAdamW(groups, **settings, moments="8bit" if name == "adamw8bit" else "float32")
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("optim.name adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, **settings)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, **settings, fused=fused or None)


class AdamWInBackward(torch.optim.Optimizer):
    """Float32 AdamW that updates each parameter inside the backward pass, as soon as its gradient
    is complete, and frees that gradient right there (`Tensor.register_post_accumulate_grad_hook`).

    The update is torch's fused AdamW kernel, one parameter at a time: the arithmetic of
    `torch.optim.AdamW(fused=True)`, bit for bit, and its state (`step`, `exp_avg`, `exp_avg_sq`),
    so checkpoints of either load into the other. The gradients of all parameters never exist at
    once: 12 bytes per float32 weight at the peak instead of 16 (the 9B with float32 masters fits
    one 141 GB GPU, docs/benchmarks.md).

    A weight changes before the later gradients of its step exist, so there is no clipping by the
    global norm and no accumulation over micro-batches; the norm is still summed as the gradients
    pass (`take_grad_norm`, for the log). From the first gradient that is not finite on, the rest
    of the step's parameters are left as they are (the kernel's `found_inf`), so a step whose loss
    is not finite changes nothing; parameters updated before such a gradient stay updated.
    `step()` updates the parameters that hold a gradient set outside a backward (by hand).
    """

    updates_in_backward = True

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._group_index = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}
        self._sum_sq: torch.Tensor | None = None  # the step's squared gradient norm so far
        self._found_inf: torch.Tensor | None = None  # 1.0 once a gradient of the step was not finite
        for p in self._group_index:
            # the state now, not at the first update: a state-less optimizer would make DCP's
            # state-dict helpers give every parameter a zero gradient at once to create it, the
            # very peak this optimizer avoids (a resumed 9B would not fit)
            self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                 exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                 exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            p.register_post_accumulate_grad_hook(hook_while_alive(self._update_in_backward))

    def _update_in_backward(self, p: torch.Tensor) -> None:
        self._update(p)
        p.grad = None

    @torch.no_grad()
    def _update(self, p: torch.Tensor) -> None:
        # by index: load_state_dict replaces the group dicts
        group = self.param_groups[self._group_index[p]]
        state = self.state[p]
        if state["step"].device != p.device:  # as loaded from a checkpoint
            state["step"] = state["step"].to(p.device, torch.float32)
        if self._sum_sq is None:
            self._sum_sq = torch.zeros((), dtype=torch.float32, device=p.device)
            self._found_inf = torch.zeros((), dtype=torch.float32, device=p.device)
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        self._sum_sq += sq
        torch.maximum(self._found_inf, (~sq.isfinite()).float(), out=self._found_inf)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        torch._fused_adamw_([p], [p.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]],
                            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], amsgrad=False, maximize=False, found_inf=self._found_inf)
        state["step"] -= self._found_inf  # a skipped update does not count

    @torch.no_grad()
    def step(self, closure=None):
        for p in self._group_index:
            if p.grad is not None:
                self._update(p)

    def take_grad_norm(self) -> torch.Tensor:
        """The norm of all gradients since the last call (the step's, as `clip_grad_norm_` returns
        it); starts the next step's count."""
        norm = torch.zeros(()) if self._sum_sq is None else self._sum_sq.sqrt()
        self._sum_sq = self._found_inf = None
        return norm


def clip_gradients(optimizer: torch.optim.Optimizer, parameters, max_norm: float,
                   clip_grad_norm=torch.nn.utils.clip_grad_norm_) -> torch.Tensor:
    """The step's gradient norm, after the backward and before `optimizer.step()`, the gradients
    clipped to `max_norm` (0: not clipped) by `clip_grad_norm`. An optimizer that updated the
    weights in the backward already (`optim.in_backward`): its summed norm, nothing to clip."""
    if getattr(optimizer, "updates_in_backward", False):
        return optimizer.take_grad_norm()
    return clip_grad_norm(parameters, max_norm if max_norm > 0 else math.inf)


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
