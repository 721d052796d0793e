"""Run under torchrun by test_sequence.py: two optimizer steps of a model directory with
sequence or context parallelism (KIND sp or cp, of DEGREE ranks) x data parallelism (the rest of
the ranks) and FSDP over all ranks, next to the same steps in this process alone. Rank 0 writes
both runs' per-step losses and every trainable parameter's gradient error after the first step to
a JSON file.

usage: sequence_worker.py MODEL_DIR KIND DEGREE OUT.json [--ac MODE] [--compile] [--lora]

The options apply to the parallel model only, in the trainer's order (adapters, sp/cp,
activation checkpointing, compile on the CPU's aot_eager backend, FSDP); the one-process model
is the plain one (with the same adapters).
"""

import argparse
import copy
import json

import torch
import torch.distributed as dist

from qwen35 import Qwen35ForCausalLM
from qwen35.lora import LoraSettings, apply_lora
from qwen35.parallel import leave_process_group
from qwen35.parallel.checkpointing import apply_activation_checkpointing
from qwen35.parallel.compile import compile_layers
from qwen35.parallel.context import apply_context_parallel
from qwen35.parallel.fsdp import apply_fsdp, data_parallel_mesh
from qwen35.parallel.sequence import apply_sequence_parallel, parallel_mesh
from qwen35.train.step import forward_backward

ROW = 48  # tokens per packed row
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj"]


def packed_row(gen, vocab: int, cuts=None) -> dict:
    """Four documents filling ROW tokens, by default of random lengths, none starting at a
    multiple of ROW/4, so documents straddle the ranks' slices (2 or 4 of them); a random ~30% of
    labels masked."""
    if cuts is None:
        allowed = torch.tensor([c for c in range(1, ROW) if c % (ROW // 4)])
        cuts = sorted(allowed[torch.randperm(len(allowed), generator=gen)[:3]].tolist())
    cu = torch.tensor([0, *cuts, ROW], dtype=torch.int32)
    ids = torch.randint(2, vocab, (1, ROW), generator=gen)
    labels = ids.masked_fill(torch.rand(1, ROW, generator=gen) < 0.3, -100)
    positions = torch.cat([torch.arange(int(b - a)) for a, b in zip(cu[:-1], cu[1:])])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "cu_seqlens": cu}


def global_sum(n: torch.Tensor) -> torch.Tensor:
    n = n.clone()
    dist.all_reduce(n)
    return n


def with_adapters(model):
    """Adapters on the attention, GDN and MLP projections, B drawn at random (not PEFT's zero), so
    that A has a gradient at the first step too."""
    apply_lora(model, LoraSettings(rank=4, alpha=8, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.weight.normal_(std=0.1)
    return model


def main(model_dir: str, kind: str, sp: int, out_path: str, ac: str, compile_: bool, lora: bool) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    world, rank = dist.get_world_size(), dist.get_rank()
    dp, dp_rank = world // sp, rank // sp
    reference = Qwen35ForCausalLM.from_pretrained(model_dir).train()
    if lora:
        with_adapters(reference)
    model = copy.deepcopy(reference)
    apply = {"sp": apply_sequence_parallel, "cp": apply_context_parallel}[kind]
    apply(model, parallel_mesh("cpu", sp)["seq"].get_group())
    # offload: the MLPs and the delta rule run in slices of 8 tokens, so the slicing counts here
    apply_activation_checkpointing(model, ac, slice_tokens=8)
    if compile_:
        compile_layers(model, backend="aot_eager")
    apply_fsdp(model, data_parallel_mesh("cpu"))

    gen = torch.Generator().manual_seed(1)
    vocab = reference.config.vocab_size
    # per step: two micro-batches for each data-parallel replica (uneven loss-token counts); the
    # first has a document over the second and third quarters (cp = 4: a slice inside one document)
    steps = [[[packed_row(gen, vocab, [5, 40, 44]), packed_row(gen, vocab)] for _ in range(dp)] for _ in range(2)]
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (reference, model)]
    losses, grad_errors = {"one": [], "parallel": []}, {}
    for step, rows in enumerate(steps):
        one = forward_backward(reference, [b for replica in rows for b in replica])
        par = forward_backward(model, rows[dp_rank], global_sum, data_parallel_size=world, ranks_per_row=sp)
        losses["one"].append(float(one.loss))
        losses["parallel"].append(float(par.loss))
        if step == 0:
            grads = dict(model.named_parameters())
            for name, p in reference.named_parameters():
                if not p.requires_grad:
                    continue
                full = grads[name].grad.full_tensor()
                grad_errors[name] = float((full - p.grad).abs().max() / p.grad.abs().max())
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "grad_errors": grad_errors}, f)
    leave_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("kind", choices=["sp", "cp"])
    parser.add_argument("degree", type=int)
    parser.add_argument("out")
    parser.add_argument("--ac", default="none")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    main(args.model_dir, args.kind, args.degree, args.out, args.ac, args.compile, args.lora)
