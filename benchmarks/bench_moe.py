"""One sparse MoE block of Qwen3.5-35B-A3B, forward and forward + backward, on one GPU:
qwen35's grouped-GEMM experts and its per-expert loop against transformers' own
`Qwen3_5MoeSparseMoeBlock` (its "eager" loop and its "grouped_mm" experts), same weights.

    python benchmarks/bench_moe.py --tokens 8192 16384
    python benchmarks/bench_moe.py --smoke        # CPU, tiny shapes, a check that it runs

Weights are bf16 for every system (the peer's setup); "ours, fp32 masters" keeps float32
parameters and runs under bf16 autocast, as the trainer does. Router and shared expert are
included in every system, so the table compares whole blocks. Before timing, each system's
output is checked against the float32 loop on the same weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen35 import ops, preset  # noqa: E402
from qwen35.model.config import Qwen35Config  # noqa: E402
from qwen35.model.moe import SparseMoeBlock  # noqa: E402
from qwen35.ops.moe import expert_loop, grouped_experts  # noqa: E402


def hf_block(config: Qwen35Config, implementation: str, ours: SparseMoeBlock):
    from transformers import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    hf_config = Qwen3_5MoeTextConfig(
        hidden_size=config.hidden_size, num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.moe_intermediate_size,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        experts_implementation=implementation)
    block = Qwen3_5MoeSparseMoeBlock(hf_config)
    block.load_state_dict(ours.state_dict())  # same names and layouts as ours
    return block


class _OursWith(torch.nn.Module):
    """Our block with the experts op pinned (the seam would pick by backend)."""

    def __init__(self, block: SparseMoeBlock, experts_op):
        super().__init__()
        self.block, self.experts_op = block, experts_op

    def forward(self, x):
        saved = ops._active["routed_experts"]
        ops._active["routed_experts"] = self.experts_op
        try:
            return self.block(x)[0]
        finally:
            ops._active["routed_experts"] = saved


def _output(module, x):
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def time_block(module, x, steps: int, warmup: int, backward: bool, autocast: bool) -> tuple[float, float]:
    device = x.device
    x = x.detach().requires_grad_(backward)

    def once():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = _output(module, x)
        if backward:
            out.float().square().mean().backward()

    for _ in range(warmup):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    module.zero_grad(set_to_none=True)
    return seconds, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="35B-A3B")
    p.add_argument("--tokens", nargs="+", type=int, default=[8192])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="leave out transformers' blocks")
    p.add_argument("--no-loop", action="store_true", help="leave out the per-expert loops (slow)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.smoke else "cuda")
    config = preset(args.preset)
    if args.smoke:
        config = Qwen35Config(**{**config.__dict__, "hidden_size": 64, "num_experts": 8, "num_experts_per_tok": 2,
                                 "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32})
        args.tokens, args.steps, args.warmup = [64], 1, 0
    torch.manual_seed(0)
    master = SparseMoeBlock(config).to(device)
    with torch.no_grad():
        for param in master.parameters():
            param.normal_(0, 0.02)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    low = SparseMoeBlock(config).to(device=device, dtype=dtype)
    low.load_state_dict(master.state_dict())

    systems = [("ours, grouped GEMM", _OursWith(low, grouped_experts), False),
               ("ours, grouped GEMM, fp32 masters", _OursWith(master, grouped_experts), not args.smoke)]
    if not args.no_loop:
        systems.append(("ours, per-expert loop", _OursWith(low, expert_loop), False))
    if not args.no_hf:
        for implementation in ("grouped_mm",) + (() if args.no_loop else ("eager",)):
            systems.append((f"transformers, {implementation}", hf_block(config, implementation, low).to(device, dtype), False))

    print(f"{args.preset} MoE block: hidden {config.hidden_size}, {config.num_experts} experts x "
          f"{config.moe_intermediate_size}, top {config.num_experts_per_tok}, shared {config.shared_expert_intermediate_size}; "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| system | tokens | fwd tokens/s | fwd+bwd tokens/s | fwd+bwd ms | peak GiB | max rel err vs fp32 loop |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        x = torch.randn(1, tokens, config.hidden_size, device=device, generator=torch.Generator(device).manual_seed(1))
        with torch.no_grad():
            reference = _OursWith(master, expert_loop)(x.float()).float()
        for name, module, autocast in systems:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = _output(module, x.to(dtype)).float()
            err = ((out - reference).norm() / reference.norm()).item()
            fwd, _ = time_block(module, x.to(dtype), args.steps, args.warmup, False, autocast)
            both, peak = time_block(module, x.to(dtype), args.steps, args.warmup, True, autocast)
            print(f"| {name} | {tokens} | {tokens / fwd:,.0f} | {tokens / both:,.0f} | {both * 1e3:.1f} | "
                  f"{peak:.2f} | {err:.1e} |", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
