"""Training metrics: one JSON line per logged step, optionally mirrored to TensorBoard.

`<output_dir>/metrics.jsonl` is the record of a run that needs no extra tools to read (`qwen35
plot`, `jq`, pandas). Each line is flushed as it is written, so a run that crashes or is killed
keeps everything it logged up to then. The file is opened for appending: a resumed run continues
the same file, and a reader takes the last line for a step that appears twice.

Only rank 0 should write; the other ranks build a logger with `enabled=False` so that the
training loop calls it the same way on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool, enabled: bool = True) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            # Imported here: tensorboard is slow to import and only rank 0 with logging on needs it.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

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

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
