"""One GRPO update on a fixed rollout batch through the run's construction pipeline (FSDP2 under
torchrun), each rank taking its share of the groups; rank 0 saves the step's metrics and the
updated weights (SGD with lr 1 and no clipping: the change is minus the gradient).

    torchrun --nproc-per-node N grpo_update_worker.py OUT.pt --model.path DIR [--lora.rank 4]
"""

import sys

import torch
from torch.distributed.tensor import DTensor

from qwen35.build import build_model, load_tokenizer
from qwen35.parallel import leave_process_group
from qwen35.parallel.fsdp import gathered_for_decoding
from qwen35.rl.config import RLRunConfig
from qwen35.rl.loss import LossConfig
from qwen35.rl.rollout import Rollout, SamplingConfig
from qwen35.rl.trainer import DataParallel, GRPOConfig, _logprobs_of, policy_update
from qwen35.train.config_parser import load_run_config
from qwen35.train.setup import Runtime

out, cfg = sys.argv[1], load_run_config(None, sys.argv[2:], RLRunConfig)
rt = Runtime.start(cfg)
torch.manual_seed(0)
policy = build_model(cfg, rt, load_tokenizer(cfg))

# 4 prompts x 3 samples, completions of different lengths, rewards that disagree in each group
groups, n = 4, 3
gen = torch.Generator().manual_seed(1)
prompts = [torch.randint(3, 90, (4 + g,), generator=gen).tolist() for g in range(groups) for _ in range(n)]
completions = [torch.randint(3, 90, (2 + (i % 4),), generator=gen).tolist() for i in range(groups * n)]
rewards = torch.tensor([float((i * 7) % 3) for i in range(groups * n)])
mine = [i for g in range(groups) if g % rt.world_size == rt.rank for i in range(g * n, g * n + n)]
rollout = Rollout([prompts[i] for i in mine], [completions[i] for i in mine], [[0.0] * len(completions[i]) for i in mine],
                  [False] * len(mine), n)
grpo = GRPOConfig(sampling=SamplingConfig(n_samples_per_prompt=n), loss=LossConfig(entropy_coef=0.01),
                  micro_batch_size=2 + rt.rank, max_grad_norm=float("inf"))  # ranks differ in micro-batch count
with gathered_for_decoding(policy):  # as grpo_step computes π_old: ranks run different forward counts
    old = _logprobs_of(policy, rollout, list(range(len(mine))), grpo, rt.autocast)
old = [x + (0.5 if i % 2 else -0.5) for i, x in zip(mine, old)]  # off-policy: ratios 0.6 and 1.6 clip
optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
before = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in policy.state_dict().items()}
metrics = policy_update(policy, optimizer, rollout, rewards[mine], old, grpo, torch.Generator().manual_seed(0),
                        data_parallel=DataParallel.from_process_group(rt.device))
after = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in policy.state_dict().items()}
trainable = sorted(n for n, p in policy.named_parameters() if p.requires_grad)
if rt.is_main:
    torch.save({"metrics": metrics, "delta": {k: after[k] - before[k] for k in after}, "trainable": trainable}, out)
leave_process_group()
