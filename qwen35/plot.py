"""Draw a run's loss curve from its metrics.jsonl (`qwen35 plot OUTPUT_DIR`).

Works on a finished run, a running one and a crashed one: a final line cut off mid-write is
skipped, and when a resumed run logged a step twice the later line wins.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_metrics(output_dir: str | Path) -> Path:
    """Plot training loss (and eval loss / accuracy when logged) against step to loss.png."""
    path = Path(output_dir) / "metrics.jsonl"
    series = _read_series(path)
    if not series.get("loss"):
        raise ValueError(f"{path} has no 'loss' values to plot")

    # The Agg canvas is attached to this figure alone: no pyplot, no global backend to switch.
    has_accuracy = bool(series.get("eval_accuracy"))
    fig = Figure(figsize=(12 if has_accuracy else 7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_accuracy else 1, squeeze=False, sharex=True)[0]

    ax = axes[0]
    ax.plot(*_xy(series["loss"]), linewidth=1, label="train loss")
    if series.get("eval_loss"):
        ax.plot(*_xy(series["eval_loss"]), marker="o", label="eval loss")
    ax.set(xlabel="step", ylabel="loss", title=Path(output_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    if has_accuracy:
        axes[1].plot(*_xy(series["eval_accuracy"]), marker="o", color="tab:green")
        axes[1].set(xlabel="step", ylabel="eval accuracy", title="eval accuracy")
        axes[1].grid(alpha=0.3)

    out = Path(output_dir) / "loss.png"
    fig.savefig(out, dpi=120)
    return out


def _read_series(path: Path) -> dict[str, dict[int, float]]:
    """metric name → {step: value}, later lines overriding earlier ones for the same step."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is this a training output directory?")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    series: dict[str, dict[int, float]] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if lineno == len(lines):  # no newline after it: cut off by a crash mid-write
                continue
            raise ValueError(f"{path}:{lineno}: not a metrics record: {line[:80]!r}") from None
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                series.setdefault(name, {})[step] = float(value)
    return series


def _xy(points: dict[int, float]) -> tuple[list[int], list[float]]:
    steps = sorted(points)
    return steps, [points[s] for s in steps]
