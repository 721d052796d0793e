"""Resumable training checkpoints through torch.distributed.checkpoint (DCP).

A checkpoint holds everything an uninterrupted run would still have in memory: model and
optimizer state (through DCP, which writes each rank's shards in parallel and loads them back
on a different number of ranks), and beside them the trainer's small state (step, lr schedule,
data position; `trainer_state.pt`) and each rank's RNG states (`rng_rank{r}.pt`).

Atomicity: a checkpoint is written into `step_00000042.partial/` and renamed to `step_00000042/`
only after every rank has finished writing. A run killed mid-save leaves a `.partial` directory
that resume ignores, so resume always starts from the last checkpoint that is whole.
"""

from __future__ import annotations

import contextlib
import random
import re
import warnings
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from qwen35.parallel import is_rank_zero

_COMPLETE = re.compile(r"^step_(\d{8})$")


def _trainable_state(model) -> dict:
    """The model's part of a checkpoint: its trainable parameters. With every weight trained that
    is the whole model; with adapters only the adapters, since the frozen base (in whatever
    form: bf16, 4-bit) is read again from `model.path` on resume."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    return {k: v for k, v in state.items() if k in trainable}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call that it runs without a process group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _COMPLETE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: Path, step: int, model, optimizer, extra: dict, keep_last: int = 0) -> Path:
    """Writes the checkpoint of `step` atomically; keeps the newest `keep_last` (0: all)."""
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if is_rank_zero():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    state = {"model": _trainable_state(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(partial))
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
    if is_rank_zero():
        torch.save({**extra, "step": step}, partial / "trainer_state.pt")
    _barrier()
    if is_rank_zero():
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        if keep_last > 0:
            for old in checkpoint_dirs(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restores model, optimizer and this rank's RNGs in place; returns the trainer state.

    On a different number of ranks than saved, a rank without its own RNG file keeps its seed.
    """
    state = {"model": _trainable_state(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))  # raises if the checkpoint lacks any of these keys
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if (path / f"rng_rank{rank}.pt").is_file():
        set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=False))
    return torch.load(path / "trainer_state.pt", weights_only=False)
