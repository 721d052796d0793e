"""Training metrics: one JSON line per logged step, optionally mirrored to TensorBoard.

`<output_dir>/metrics.jsonl` is the record of a run that needs no extra tools to read (`qwen35
plot`, `jq`, pandas); TensorBoard and Weights & Biases get the same scalars when switched on. Each line is flushed as it is written, so a run that crashes or is killed
keeps everything it logged up to then. The file is opened for appending: a resumed run continues
the same file, and a reader takes the last line for a step that appears twice.

Only rank 0 should write; the other ranks build a logger with `enabled=False` so that the
training loop calls it the same way on every rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen35.errors import UserError


@dataclass
class WandbSettings:
    project: str
    run_name: str
    config: dict = field(default_factory=dict)  # the run config, shown beside the curves


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool, enabled: bool = True,
                 wandb: WandbSettings | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._writer = None
        self._wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            # Imported here: tensorboard is slow to import and only rank 0 with logging on needs it.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if wandb is not None:
            self._wandb_run = _start_wandb(wandb, Path(output_dir))

    def log(self, step: int, **scalars: Any) -> None:
        """Record scalars (loss, lr, grad_norm, tokens_per_s, eval_loss, ...) at an optimizer step.

        Values may be Python numbers or 0-d tensors; NaN and inf are written as JSON's
        `NaN`/`Infinity`, which Python reads back, because a diverged loss is worth keeping.
        """
        if self._file is None:
            return
        record = {"step": int(step), **{name: float(value) for name, value in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name != "step":
                    self._writer.add_scalar(name, value, global_step=record["step"])
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_wandb(settings: WandbSettings, output_dir: Path):
    try:
        import wandb
    except ImportError:
        raise UserError("log.wandb is on but wandb is not installed: pip install wandb") from None
    return wandb.init(project=settings.project, name=settings.run_name, config=settings.config,
                      dir=str(output_dir))
