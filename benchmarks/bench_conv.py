"""The GDN layers' short conv + SiLU, forward and backward: ours (`qwen35.ops.fast_conv`) against
fla's `causal_conv1d`, 8,192 tokens in 4 documents at the 0.8B and 2B channel counts (6,144 and
8,192), bf16 input, float32 weight. Prints the wall time per call (20 eager calls) and each
kernel's GPU time from one profiled call of each.

    python benchmarks/bench_conv.py
"""
import sys

import torch
sys.path.insert(0, ".")
from qwen35.ops import fast_conv
from benchmarks.bench_train import document_lengths
from benchmarks.timing import ms_per_call
from fla.modules.causal_conv1d import causal_conv1d as fla_conv
for channels in (6144, 8192):
    lengths = document_lengths(8192, 4)
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(1, 8192, channels, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(channels, 4, device="cuda") * 0.5).requires_grad_()
    dy = torch.randn(1, 8192, channels, device="cuda", dtype=torch.bfloat16)
    def ours():
        y = fast_conv.causal_conv1d(x, w, cu)
        y.backward(dy)
    def theirs():
        y, _ = fla_conv(x, w, activation="silu", cu_seqlens=cu)
        y.backward(dy)
    for name, fn in (("ours", ours), ("fla", theirs)):
        print(f"conv fwd+bwd {channels} channels, 8192 tokens in 4 docs: {name} {ms_per_call(fn, 20):.3f} ms", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ours(); theirs(); torch.cuda.synchronize()
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            print(f"   {e.self_device_time_total:8.1f} us  {e.key[:80]}")
