"""Where the host's time goes in one compiled training step (ours, 8k tokens in 4 documents).

    python benchmarks/profile_host.py 0.8B fp32m      # or: 2B bf16

Prints the step time; the host's enqueue time of forward, backward and optimizer (the GPU runs
behind, so on a host-bound step these add up to the step); a cProfile of one forward (Python
functions by own and cumulative time); the torch profiler's CPU-op table; kernels per step; and
dynamo's graph and graph-break counts. Writes the step's chrome trace (gzipped) to $OUT or /tmp.
Needs the GPU stack (`FLA_CACHE_MODE=fuzzy FLA_CONFIG_DIR=...` as for bench_train.py).
"""
import contextlib
import cProfile
import gzip
import io
import os
import pstats
import shutil
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch
sys.path.insert(0, ".")
from benchmarks import bench_train as B
from qwen35 import Qwen35ForCausalLM, ops, preset
from qwen35.parallel.compile import compile_layers

OUT = os.environ.get("OUT", "/tmp")
name = sys.argv[1] if len(sys.argv) > 1 else "0.8B"
precision = sys.argv[2] if len(sys.argv) > 2 else "fp32m"
ops.use_backend("fast")
dev = torch.device("cuda")
config = preset(name)
model = Qwen35ForCausalLM.from_config(config, device=dev, dtype=torch.float32 if precision == "fp32m" else torch.bfloat16)
compile_layers(model)
params = [p for p in model.parameters()]
opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True)
lengths = B.document_lengths(8192, 4)
batch = B.packed_batch(config.vocab_size, lengths, dev)
ac = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "fp32m" else contextlib.nullcontext()

def fwd():
    with ac:
        return model(**batch)

def step():
    out = fwd()
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

for _ in range(4):
    step()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    step()
torch.cuda.synchronize()
print(f"{name} {precision}: step {1e3 * (time.perf_counter() - t) / 10:.1f} ms", flush=True)
rows = []
for _ in range(5):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    out = fwd(); t1 = time.perf_counter()
    out.loss.backward(); t2 = time.perf_counter()
    opt.step(); opt.zero_grad(set_to_none=True); t3 = time.perf_counter()
    torch.cuda.synchronize(); t4 = time.perf_counter()
    rows.append([1e3 * x for x in (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)])
for r in rows:
    print("host fwd %.1f  bwd %.1f  opt %.1f  drain %.1f  total %.1f ms" % tuple(r), flush=True)
# GPU time alone: all kernels of one step launched, then timed with the queue already full
torch.cuda.synchronize()
pr = cProfile.Profile()
pr.enable(); out = fwd(); pr.disable()
out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); torch.cuda.synchronize()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(40); print(s.getvalue()[:12000])
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(50); print(s.getvalue()[:12000])
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
    step(); torch.cuda.synchronize()
prof.export_chrome_trace("/tmp/trace.json")
with open("/tmp/trace.json", "rb") as f, gzip.open(f"{OUT}/trace_{name}_{precision}.json.gz", "wb") as g:
    shutil.copyfileobj(f, g)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45), flush=True)
kern = B.gpu_kernels(prof.events())
print("kernels per step:", len(kern))
from torch._dynamo.utils import counters
print("dynamo stats:", dict(counters["stats"]))
print("graph breaks:", {k: v for k, v in counters["graph_break"].items()})
