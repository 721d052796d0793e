"""Where one decode step of the rollout engine spends its GPU time.

    python benchmarks/profile_decode.py --presets 0.8B 2B --batch 256 --prompt-len 1024

For each preset: the engine's slots are prefilled with `--batch` random prompts, then
- `graph`: the decode step as the engine runs it (a CUDA graph replay), ms per step;
- `sample`: drawing the next token at temperature 1 and its log-prob (eager, as the engine does);
- the eager step under the torch profiler: GPU kernel time per kernel name, largest first, so the
  step's cost is attributed (a graph replays the same kernels).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import ms_per_call  # noqa: E402
from qwen35 import Qwen35ForCausalLM, ops, preset  # noqa: E402
from qwen35.engine import DecodeEngine  # noqa: E402
from qwen35.generate import sample_next  # noqa: E402


def profile_preset(name: str, batch: int, prompt_len: int, top: int, compile_step: bool) -> None:
    torch.manual_seed(0)
    model = Qwen35ForCausalLM.from_config(preset(name), device="cuda", dtype=torch.bfloat16).eval()
    engine = DecodeEngine(model, num_slots=batch, max_length=prompt_len + 512, cuda_graphs=False)
    if compile_step:
        engine._step = torch.compile(engine._step, dynamic=False)
    engine._capture_graphs()
    prompts = torch.randint(2, model.config.vocab_size, (batch, prompt_len)).tolist()
    with torch.no_grad():
        engine._prefill(prompts, list(range(batch)))
    bucket = next(b for b in engine.buckets if b > prompt_len)
    generator = torch.Generator(device="cuda").manual_seed(0)

    def sample():
        token = sample_next(engine.logits, True, 1.0, 0, 1.0, generator)
        torch.log_softmax(engine.logits, dim=-1).gather(-1, token[:, None])

    with torch.no_grad():
        graph_ms = ms_per_call(lambda: engine._decode(bucket), 20)
        eager_ms = ms_per_call(lambda: engine._step(bucket), 10)
        sample_ms = ms_per_call(sample, 20)
        print(f"\n{name}, {batch} slots, keys up to {bucket}: graph step {graph_ms:.2f} ms, eager step "
              f"{eager_ms:.2f} ms, sampling + log-prob {sample_ms:.2f} ms", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                engine._step(bucket)
                sample()
            torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 5 / 1e3, e.count // 5) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(ms for _, ms, _ in rows)
    print(f"GPU kernel time per step (eager step + sampling): {total:.2f} ms", flush=True)
    for key, ms, count in rows[:top]:
        print(f"  {ms:7.3f} ms {ms / total:6.1%}  x{count:<4d} {key[:110]}", flush=True)
    del engine, model
    torch.cuda.empty_cache()


def gdn_step_tiles(batch: int, heads: int = 16, dim: int = 128) -> None:
    """The in-place recurrent step kernel at (BV, num_warps) tilings: ms per call, same result."""
    import triton

    from qwen35.ops import fast

    torch.manual_seed(0)
    q, k = (torch.randn(batch, 1, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(batch, 1, heads, dim, device="cuda", dtype=torch.bfloat16)
    g = -torch.rand(batch, 1, heads, device="cuda")
    beta = torch.rand(batch, 1, heads, device="cuda", dtype=torch.bfloat16)
    state0 = torch.randn(batch, heads, dim, dim, device="cuda") * 0.1
    reference = None
    print(f"\nGDN step kernel, {batch} x {heads} heads x {dim}x{dim} float32 state "
          f"({2 * state0.numel() * 4 / 1e6:.0f} MB moved per call):", flush=True)
    for block_v, warps in [(8, 1), (8, 2), (16, 1), (16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8)]:
        state = state0.clone()
        o = torch.empty_like(v)

        def call():
            fast._fla_recurrent_kernel[(triton.cdiv(dim, block_v) * batch * heads,)](
                q=q, k=k, v=v, g=g, gk=None, gv=None, beta=beta, A_log=None, dt_bias=None, o=o,
                h0=state, ht=state, cu_seqlens=None, scale=dim**-0.5, T=1, H=heads, HV=heads, K=dim,
                V=dim, BK=dim, BV=block_v, USE_QK_L2NORM_IN_KERNEL=True, IS_BETA_HEADWISE=True,
                STATE_V_FIRST=False, APPLY_BETA_SIGMOID=False, ALLOW_NEG_EIGVAL=False,
                num_warps=warps, num_stages=3)

        call()
        result = (o.clone(), state.clone())
        if reference is None:
            reference = result
        diff = max((a - b).abs().max().item() for a, b in zip(result, reference))
        ms = ms_per_call(call, 50)
        print(f"  BV {block_v:3d} warps {warps}: {ms * 1e3:7.1f} us "
              f"({2 * state0.numel() * 4 / ms / 1e9:.2f} TB/s), max |diff| vs BV 8 {diff:.1e}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["0.8B", "2B"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step before capturing it")
    p.add_argument("--gdn-tiles", action="store_true", help="time the in-place GDN step kernel's tile sizes")
    args = p.parse_args(argv)
    ops.use_backend("fast")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name in args.presets:
        start = time.perf_counter()
        profile_preset(name, args.batch, args.prompt_len, args.top, args.compile)
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    if args.gdn_tiles:
        gdn_step_tiles(args.batch)


if __name__ == "__main__":
    main()
