"""One optimizer step's gradients under a run config's parallelism (FSDP, expert parallelism),
gathered into full tensors; rank 0 saves them with the step's loss.

    torchrun ... step_gradients.py OUT.pt --model.preset tiny-moe --parallel.ep 2 ...
"""

import sys

import torch
from torch.distributed.tensor import DTensor

from qwen35.build import build_model_and_tokenizer
from qwen35.parallel import leave_process_group
from qwen35.train.config_parser import load_run_config
from qwen35.train.setup import Runtime, prepare_data
from qwen35.train.step import forward_backward
from qwen35.train.trainer import _global_count

out, cfg = sys.argv[1], load_run_config(None, sys.argv[2:])
rt = Runtime.start(cfg)
torch.manual_seed(cfg.train.seed)  # as the trainer draws the initial weights
model, tokenizer = build_model_and_tokenizer(cfg, rt)
data = prepare_data(cfg, tokenizer, rt)
batches = iter(data.loader)
micro = [next(batches) for _ in range(cfg.train.global_batch_size // rt.world_size // cfg.train.micro_batch_size)]
result = forward_backward(model, micro, _global_count, rt.autocast_dtype, cfg.train.router_z_loss_coef,
                          rt.world_size, cfg.train.router_balance)
grads = {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for name, p in model.named_parameters()}
if rt.is_main:
    torch.save({"loss": result.loss, "aux": result.router["aux_loss"], "grads": grads}, out)
leave_process_group()
