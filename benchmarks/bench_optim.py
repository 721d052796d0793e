"""Loss curves of the memory-frugal optimizer options against float32 masters, same data, same seed.

    python benchmarks/bench_optim.py --out results/                       # GPU: 0.8B, 8k rows, 200 steps
    python benchmarks/bench_optim.py --smoke --out /tmp/curves            # CPU, tiny preset, a few steps
    python benchmarks/bench_optim.py --preset 9B --seq-len 4096 --ac full --compile --grad-clip 0 \
        --variants float32:adamw:in_backward bf16_kahan:adamw8bit --out results/   # 9B on one H200

Each variant trains the same randomly initialised preset from scratch on the built-in arithmetic
task (`qwen35.data.task`, rendered and packed as the trainer does) with the trainer's own pieces:
`build_model` (bf16 parameters for the bf16 options), `build_optimizer`, the lr schedule and
`forward_backward`. Variants are `optim.weights:optim.name` pairs. Writes `curves.csv` (step, one
loss column per variant), `curves.png`, and prints per variant the mean loss of the last 20 steps,
the largest gap to the float32-master curve (both smoothed over 10 steps), tokens/s and peak memory.
`float32:adamw:in_backward` is float32 AdamW applied inside the backward (`optim.in_backward`):
the same arithmetic as `float32:adamw` in 12 instead of 16 bytes per weight, so the float32
reference of a model too large for `float32:adamw` (the 9B on one H200); it cannot clip, so the
comparison then runs every variant with `--grad-clip 0`.

The default lr (1e-4, cosine to 1e-5) is where rounding matters: an Adam step moves a weight by
about lr, and bf16 keeps 8 significant bits, so plain bf16 weights lose most updates of weights
above ~0.01-0.03 while the Kahan-compensated ones keep them.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen35.build import build_model, load_tokenizer  # noqa: E402
from qwen35.data.task import build_task  # noqa: E402
from qwen35.train.config_parser import load_run_config  # noqa: E402
from qwen35.train.optim import build_optimizer, build_scheduler, clip_gradients  # noqa: E402
from qwen35.train.setup import Runtime, prepare_data  # noqa: E402
from qwen35.train.step import forward_backward  # noqa: E402

REFERENCES = ("float32:adamw", "float32:adamw:in_backward")  # the same arithmetic
DEFAULT_VARIANTS = ["float32:adamw", "bf16_kahan:adamw8bit", "bf16:adamw", "bf16_kahan:adamw", "float32:adamw8bit"]


def run_variant(variant: str, args, work: Path) -> dict:
    """Trains one variant; returns its losses per step, tokens/s and peak memory."""
    weights, name, *mode = variant.split(":")
    flags = ["--model.preset", args.preset, "--data.train_path", str(work / "task" / "train.jsonl"),
             "--data.seq_len", str(args.seq_len), "--data.cache_dir", str(work / "cache"),
             "--train.global_batch_size", "1", "--train.micro_batch_size", "1",
             "--train.max_steps", str(args.steps), "--train.output_dir", str(work / variant.replace(":", "_")),
             "--train.compile", str(args.compile).lower(), "--optim.lr", str(args.lr),
             "--optim.warmup_steps", str(args.warmup), "--optim.weight_decay", "0.1",
             "--optim.name", name, "--optim.weights", weights, "--optim.in_backward", str(mode == ["in_backward"]),
             "--train.grad_clip", str(args.grad_clip), "--train.activation_checkpointing", args.ac]
    if args.smoke:
        flags += ["--model.kernels", "reference"]
    cfg = load_run_config(None, flags)
    rt = Runtime.start(cfg)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer, rt)
    model = build_model(cfg, rt, tokenizer)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps,
                                name=name, weights=weights, in_backward=cfg.optim.in_backward)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, args.steps, cfg.optim.scheduler,
                                cfg.optim.min_lr_ratio)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches = iter(data.loader)
    losses, tokens, start = [], 0, None
    for step in range(args.steps):
        if step == 2:  # the first steps compile and autotune
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        micro = [{k: v.to(rt.device) for k, v in next(batches).items()}]
        result = forward_backward(model, micro, autocast_dtype=rt.autocast_dtype)
        clip_gradients(optimizer, model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(result.loss))
        tokens += micro[0]["input_ids"].numel()
    seconds = time.perf_counter() - start if start is not None else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if rt.device.type == "cuda" else float("nan")
    del model, optimizer, data
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return {"losses": losses, "tokens_per_s": tokens / seconds, "peak_gib": peak}


def smoothed(values: list[float], window: int = 10) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def summarize(curves: dict[str, dict]) -> list[str]:
    """One line per variant: the mean of its last 20 losses, its largest smoothed gap to the
    float32-master curve over the whole run and over its second half, speed and memory. The
    whole-run gap is set in the first steps, where the loss falls by an order of magnitude per
    few steps and a one-step lag (bf16 forward, rounded initial weights) shows as a gap of ~1;
    the second half's gap is where the weights' precision shows."""
    name = next((v for v in curves if v in REFERENCES), None)
    reference = smoothed(curves[name]["losses"]) if name else None
    lines = [f"| variant | loss, mean of last 20 steps | largest gap to {name} (10-step means): "
             "whole run | second half | tokens/s | peak GiB |", "|---|---|---|---|---|---|"]
    for variant, run in curves.items():
        losses = run["losses"]
        tail = sum(losses[-20:]) / len(losses[-20:])
        gaps = [] if reference is None else [abs(a - b) for a, b in zip(smoothed(losses), reference)]
        whole = f"{max(gaps):.4f}" if gaps else ""
        late = f"{max(gaps[len(gaps) // 2:]):.4f}" if gaps else ""
        lines.append(f"| {variant} | {tail:.4f} | {whole} | {late} | {run['tokens_per_s']:,.0f} "
                     f"| {run['peak_gib']:.1f} |")
    return lines


def write_outputs(curves: dict[str, dict], out: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    steps = max(len(run["losses"]) for run in curves.values())
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *curves])
        for i in range(steps):
            writer.writerow([i + 1, *(f"{run['losses'][i]:.6f}" if i < len(run["losses"]) else ""
                                      for run in curves.values())])
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for variant, run in curves.items():
        ax.plot(range(1, len(run["losses"]) + 1), smoothed(run["losses"]), linewidth=1, label=variant)
    ax.set(xlabel="step", ylabel="loss (10-step mean)", title=title, yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out / "curves.png", dpi=120)


def main(argv=None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="0.8B")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--ac", default="none", help="train.activation_checkpointing (full for the 9B)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="train.grad_clip; 0: none (in_backward needs it)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="optim.weights:optim.name pairs; float32:adamw:in_backward for optim.in_backward")
    p.add_argument("--out", type=Path, required=True, help="curves.csv and curves.png go here")
    p.add_argument("--work", type=Path, help="task data and token cache (default: OUT/work)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny preset, 256-token rows, reference ops")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len = "tiny", min(args.seq_len, 256)
    work = args.work or args.out / "work"
    build_task(work / "task", n_train=2000 if args.smoke else 20000, n_val=16)
    print("command:", " ".join(sys.argv), flush=True)
    curves = {}
    for variant in args.variants:
        start = time.perf_counter()
        try:
            curves[variant] = run_variant(variant, args, work)
        except torch.OutOfMemoryError as e:
            print(f"[OOM] {variant}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        losses = curves[variant]["losses"]
        print(f"{variant}: {time.perf_counter() - start:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
        # after every variant, so that a run stopped by a time limit keeps what it finished
        write_outputs(curves, args.out, f"{args.preset}, {args.seq_len}-token rows, lr {args.lr:g}")
    print("\n" + "\n".join(summarize(curves)), flush=True)
    return curves


if __name__ == "__main__":
    main()
