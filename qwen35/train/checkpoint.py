"""Resumable training checkpoints through torch.distributed.checkpoint (DCP).

A checkpoint holds everything an uninterrupted run would still have in memory: model and
optimizer state (through DCP, which writes each rank's shards in parallel and loads them back
on a different number of ranks), and beside them the trainer's small state (step, lr schedule,
data position; `trainer_state.pt`) and each rank's RNG states (`rng_rank{r}.pt`).

Atomicity: a checkpoint is written into `step_00000042.partial/` and renamed to `step_00000042/`
only after every rank has finished writing (`atomic_directory`, which the Hugging Face exports use
too). A run killed mid-save leaves a `.partial` directory that resume ignores, so resume starts
from the last checkpoint that is whole; one that was renamed but later damaged (a truncated file)
is named and skipped for the one before it (`load_first_readable`).

Ownership: each checkpoint records the id of the run that wrote it (`checkpoint.json`), and a
run prunes only its own checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
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

from qwen35.errors import UserError
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


def checkpoint_dirs(root: Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints under `root`, oldest first; with `run_id`, only that run's."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _COMPLETE.match(p.name)) and p.is_dir()]
    dirs = [p for _, p in sorted(found)]
    return dirs if run_id is None else [p for p in dirs if checkpoint_run_id(p) == run_id]


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run that wrote the checkpoint at `path` (None: unrecorded or unreadable)."""
    try:
        return json.loads((path / "checkpoint.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """All ranks write into `final.partial`; it replaces `final` once every rank is done.

    Rank 0 creates and renames; barriers around both keep another rank from writing into a
    directory that is not there yet, or reading `final` before it is complete. If the body
    raises, `final` is left as it was and the `.partial` directory shows what was cut short.
    """
    partial = final.with_name(final.name + ".partial")
    if is_rank_zero():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    yield partial
    _barrier()
    if is_rank_zero():
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    _barrier()


def save_checkpoint(root: Path, step: int, model, optimizer, extra: dict, keep_last: int = 0,
                    run_id: str | None = None) -> Path:
    """Writes the checkpoint of `step` atomically; keeps this run's newest `keep_last` (0: all)."""
    final = root / f"step_{step:08d}"
    with atomic_directory(final) as partial:
        state = {"model": _trainable_state(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(partial))
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
        if is_rank_zero():
            torch.save({**extra, "step": step}, partial / "trainer_state.pt")
            (partial / "checkpoint.json").write_text(json.dumps({"run_id": run_id, "step": step}) + "\n")
    if is_rank_zero() and keep_last > 0:
        for old in checkpoint_dirs(root, run_id)[:-keep_last]:
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


def load_model_weights(path: Path, model) -> None:
    """Restores only the model's part of the checkpoint at `path` (what an export needs); raises
    `UserError` naming the checkpoint when it cannot be read."""
    state = {"model": _trainable_state(model)}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 (see load_first_readable)
        raise UserError(f"checkpoint {path} is unreadable ({_reason(e)})") from e
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))


def load_first_readable(candidates: list[Path], model, optimizer,
                        warn: Callable[[str], None] = print) -> tuple[Path, dict]:
    """Loads the first of `candidates` (newest first) that every rank can read.

    A checkpoint that fails (a truncated or missing file) is named with the reason, and the next
    one is tried; each later attempt overwrites whatever the failed one loaded. Every rank takes
    the same decision, since a per-rank file (its RNG state) can fail on one rank alone.
    """
    assert candidates
    for i, path in enumerate(candidates):
        state, error = None, None
        try:
            state = load_checkpoint(path, model, optimizer)
        # Any failure to read makes the checkpoint unusable; DCP's own CheckpointException derives
        # from BaseException, hence the explicit tuple.
        except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001
            error = e
        if _on_every_rank(error is None):
            return path, state
        reason = _reason(error) if error else "another rank could not read its part"
        if i + 1 == len(candidates):
            newer = f"; so were the {i} newer one(s) named above" if i else ""
            raise UserError(f"cannot resume: checkpoint {path} is unreadable ({reason}){newer}") from error
        warn(f"checkpoint {path} is unreadable ({reason}); resuming from {candidates[i + 1]} instead")
    raise AssertionError("unreachable")


def _reason(error: BaseException) -> str:
    """The first line of what went wrong; for DCP's wrapper, of the first rank's own error."""
    if isinstance(error, dcp.api.CheckpointException) and error.failures:
        wrapped = next(iter(error.failures.values()))
        error = wrapped[0] if isinstance(wrapped, tuple) else wrapped
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def _on_every_rank(ok: bool) -> bool:
    """Whether `ok` holds on every rank: one all-reduce of a flag."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([int(not ok)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0
