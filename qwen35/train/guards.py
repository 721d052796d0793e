"""What the training loop watches besides the loss: stop signals and non-finite numbers.

Both are decided on every rank alike. A signal may reach one rank and not the others (or reach
them a step apart); if each acted on its own flag, one rank would enter the checkpoint save while
another starts the next step's all-reduce, and both would hang. So each step ends with one
all-reduce (a max) of two small integers, the signal seen and whether the step was non-finite,
and every rank acts on the result.
"""

from __future__ import annotations

import math
import signal

import torch
import torch.distributed as dist


class StopSignal:
    """While active, SIGTERM/SIGINT only record that the run should stop after the current step
    (with a checkpoint). A second SIGINT (Ctrl-C twice) stops at once, without one."""

    def __init__(self) -> None:
        self.signum = 0  # the signal received; 0: none
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agree(signum: int, nonfinite: bool, device: torch.device) -> tuple[int, bool]:
    """The signal (0: none) and non-finite flag that hold for the whole step: max over ranks."""
    if not dist.is_initialized():
        return signum, nonfinite
    flags = torch.tensor([signum, int(nonfinite)], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    signum, nonfinite = flags.tolist()
    return signum, bool(nonfinite)


class NonFiniteSteps:
    """Counts skipped steps, in all and in a row."""

    def __init__(self) -> None:
        self.total = 0
        self.in_a_row = 0

    def update(self, finite: bool) -> None:
        self.in_a_row = 0 if finite else self.in_a_row + 1
        self.total += not finite


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


@torch.no_grad()
def weights_are_finite(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every trainable weight on every rank is finite (one all-reduce on `device`)."""
    bad = 0
    for p in model.parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP: this rank's shard
            bad += int((~torch.isfinite(local)).any())
    if dist.is_initialized():
        flag = torch.tensor(bad, device=device)
        dist.all_reduce(flag)
        bad = int(flag)
    return bad == 0
