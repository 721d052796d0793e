"""The float32 AdamW step alone, at a preset's parameter shapes: the trainer's optimizer against
the same update over one flat buffer, so that the gap to the HBM bound is visible.

    python benchmarks/bench_adamw.py --presets 0.8B 2B

Per variant: ms per step (20 steps after 3), and the bytes an update must move (weight, gradient
and both moments read, weight and moments written: 28 bytes per weight) divided by that time.
Variants: `trainer` is `qwen35.train.optim.build_optimizer` (torch's fused AdamW over the
parameter list, two groups); `foreach` is torch's multi-tensor AdamW over the same list; `flat`
is torch's fused kernel over one tensor holding every weight (the same arithmetic, no list).
Set PYTORCH_CUDA_ALLOC_CONF to compare allocator settings (bench_train.py runs with expandable
segments).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import ms_per_call  # noqa: E402
from qwen35 import Qwen35ForCausalLM, preset  # noqa: E402
from qwen35.train.optim import build_optimizer  # noqa: E402

BYTES_PER_WEIGHT = 28


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["0.8B", "2B"])
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}")
    print("| preset | weights | variant | ms per step | GB/s moved |")
    print("|---|---|---|---|---|")
    for name in args.presets:
        model = Qwen35ForCausalLM.from_config(preset(name), device="cuda", dtype=torch.float32)
        params = list(model.parameters())
        numel = sum(p.numel() for p in params)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        variants = {
            "trainer": build_optimizer(model, 1e-5, 0.1, (0.9, 0.95), 1e-8),
            "foreach": torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95), foreach=True),
        }
        flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in params]))
        flat.grad = torch.cat([p.grad.flatten() for p in params])
        variants["flat"] = torch.optim.AdamW([flat], lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
        for variant, optimizer in variants.items():
            ms = ms_per_call(optimizer.step, 20)
            print(f"| {name} | {numel / 1e9:.2f}B | {variant} | {ms:.1f} | "
                  f"{BYTES_PER_WEIGHT * numel / ms / 1e6:,.0f} |", flush=True)
            optimizer.state.clear()
        del model, params, flat, variants
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
