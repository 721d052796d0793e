"""An output directory belongs to one run.

`<output_dir>/run.json` records the id of the run that owns the directory, and each checkpoint
records the id of the run that wrote it (so a run prunes only its own). Before any work,
`plan_run` decides from `train.resume` and `train.overwrite_output_dir` what this run does with
the directory, and refuses what would mix two runs or silently do something else than asked:

- a fresh run (`resume: false`) into a directory that holds a run's record (checkpoints,
  exports, metrics, run.json), unless `overwrite_output_dir: true`, which deletes that record;
- `resume: true` with nothing to resume (`resume: auto` starts fresh instead);
- `resume: PATH` where PATH is neither a checkpoint nor an output directory with checkpoints.

Resuming from a checkpoint of another directory starts a new run (a new id) from it, into an
output directory that must be free as for a fresh run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from qwen35.errors import UserError
from qwen35.train.checkpoint import checkpoint_dirs, checkpoint_run_id
from qwen35.train.config import TrainConfig

RUN_FILE = "run.json"
# What a run writes into its output directory. The built-in run's generated task and tokenizer
# (builtin/) are inputs, not part of a run's record, and are kept.
_RECORD = ("checkpoints", "final", "final.partial", "metrics.jsonl", "tensorboard", RUN_FILE, "run_config.yaml")
_EXPORTS = "export_step_*"


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    resume_from: tuple[Path, ...]  # checkpoints to try, newest first; empty: start at step 0
    clear: bool  # delete the previous run's record first (train.overwrite_output_dir)
    started_from: str | None = None  # a checkpoint of another directory this run continues


def plan_run(train: TrainConfig, out_dir: Path) -> RunPlan:
    """What this run does with `out_dir`; reads only, so every rank could call it."""
    resume, overwrite = train.resume, train.overwrite_output_dir
    owner = run_owner(out_dir)
    own = tuple(reversed(checkpoint_dirs(out_dir / "checkpoints")))
    if resume is True or resume == "auto":
        if own:
            _not_both(overwrite)
            return RunPlan(owner or checkpoint_run_id(own[0]) or _new_id(), own, clear=False)
        if resume is True:
            raise UserError(f"train.resume true: {out_dir / 'checkpoints'} holds no complete checkpoint "
                            "to resume; set train.resume auto to start fresh when there is none")
        if owner is not None and not overwrite:  # the same run again: it died before its first save
            return RunPlan(owner, (), clear=False)
    elif resume is not False:
        found = checkpoints_at(Path(resume))
        if found[0].resolve().is_relative_to(out_dir.resolve()):
            _not_both(overwrite)
            return RunPlan(owner or checkpoint_run_id(found[0]) or _new_id(), found, clear=False)
        _refuse_if_taken(out_dir, owner, overwrite)
        return RunPlan(_new_id(), found, clear=overwrite, started_from=str(found[0].resolve()))
    _refuse_if_taken(out_dir, owner, overwrite)
    return RunPlan(_new_id(), (), clear=overwrite)


def claim(out_dir: Path, plan: RunPlan) -> None:
    """Rank 0: clears the previous run's record if the plan says so, and writes run.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if plan.clear:
        for entry in _record(out_dir):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    if run_owner(out_dir) != plan.run_id:
        # The working directory resolves the relative paths of run_config.yaml (`qwen35 export`).
        info = {"run_id": plan.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "working_dir": os.getcwd()}
        if plan.started_from:
            info["started_from"] = plan.started_from
        (out_dir / RUN_FILE).write_text(json.dumps(info, indent=1) + "\n")


def working_dir(out_dir: Path) -> Path:
    """Where the run of `out_dir` started (recorded in its run file), against which its config's
    relative paths resolve; this process's working directory where nothing is recorded."""
    try:
        recorded = json.loads((out_dir / RUN_FILE).read_text()).get("working_dir")
    except (OSError, ValueError, AttributeError):
        recorded = None
    return Path(recorded) if recorded else Path.cwd()


def run_owner(out_dir: Path) -> str | None:
    path = out_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["run_id"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a run record ({e}); delete it, or choose another train.output_dir") from None


def _record(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    return [out_dir / n for n in _RECORD if (out_dir / n).exists()] + sorted(out_dir.glob(_EXPORTS))


def _refuse_if_taken(out_dir: Path, owner: str | None, overwrite: bool) -> None:
    record = _record(out_dir)
    if not record or overwrite:
        return
    checkpoints = checkpoint_dirs(out_dir / "checkpoints")
    latest = f"; its latest checkpoint is {checkpoints[-1].name}" if checkpoints else ""
    raise UserError(
        f"train.output_dir {out_dir} already holds {'run ' + owner if owner else 'a run'} "
        f"({', '.join(p.name for p in record)}{latest}). Continue it with --train.resume true, delete it "
        "and start over with --train.overwrite_output_dir true, or choose another train.output_dir")


def _not_both(overwrite: bool) -> None:
    if overwrite:
        raise UserError("train.overwrite_output_dir would delete the checkpoints that train.resume continues "
                        "from; set one of them")


def checkpoints_at(path: Path, key: str = "train.resume") -> tuple[Path, ...]:
    """`train.resume: PATH` (or `key`'s PATH): one checkpoint, or an output directory's (or
    checkpoints/'s) complete checkpoints, newest first."""
    if not path.exists():
        raise UserError(f"{key}: {path} does not exist")
    if path.name.endswith(".partial"):
        raise UserError(f"{key}: {path} is an incomplete checkpoint (its save was cut short); "
                        "give a complete one, or the output directory to take its latest")
    if (path / "trainer_state.pt").is_file() or (path / ".metadata").is_file():
        return (path,)
    for root in (path / "checkpoints", path):
        found = checkpoint_dirs(root)
        if found:
            return tuple(reversed(found))
    raise UserError(f"{key}: {path} is neither a checkpoint (step_NNNNNNNN) nor an output directory "
                    "with complete checkpoints")


def _new_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
