"""Loads a checkpoint into an FSDP2-sharded model and reports this rank's resident-memory growth."""

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from qwen35 import Qwen35ForCausalLM
from qwen35.checkpoint.hf import load_weights, read_model_config
from qwen35.parallel import leave_process_group
from qwen35.parallel.fsdp import apply_fsdp, data_parallel_mesh


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


dist.init_process_group("gloo")
mesh = data_parallel_mesh("cpu")
Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
before = current_rss_bytes()
with torch.device("meta"):  # as qwen35.build does: sharded before it has memory
    model = Qwen35ForCausalLM(read_model_config(sys.argv[1]))
apply_fsdp(model, mesh)
model.to_empty(device="cpu")
model.tie_weights()
load_weights(model, sys.argv[1])
peak = max(peak_rss_bytes(), current_rss_bytes())
Path(sys.argv[2].format(rank=dist.get_rank())).write_text(json.dumps({"growth": peak - before}))
leave_process_group()
