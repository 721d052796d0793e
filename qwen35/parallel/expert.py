"""Expert parallelism: each rank of an `ep` group holds E/ep of every MoE layer's routed experts.

Applied to a built model from outside, before FSDP: each `Experts` module keeps only its rank's
slice of `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` as DTensors sharded along the expert
dimension of the mesh's `ep` dimension (so checkpoints see the whole [E, ...] tensors, each rank
writing and reading its own experts), and runs its tokens through the experts of every rank:

1. the router's N*K token copies are sorted by expert, which groups them by the rank that owns it;
2. the copies per expert are exchanged first (one small all-to-all), so that each rank knows how
   many rows it sends to and receives from every other rank;
3. the rows go to their experts' ranks (`all_to_all_single`, differentiable), run through the
   local experts with the same op as one process (`ops.routed_experts` with one expert per row:
   grouped GEMM on the fast path, the loop on the reference), and come back the same way;
4. the routing weights scale the returned rows, which are added to their tokens.

Every rank is still a data-parallel rank with its own tokens; the mesh is (dp_mod_ep, ep) with
ep ranks inside each group of `ep` consecutive ranks. FSDP then shards the experts over
`dp_mod_ep` and everything else over all ranks (`qwen35.parallel.fsdp`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed._functional_collectives import (AsyncCollectiveTensor, all_to_all_single_autograd,
                                                      wait_tensor)
from torch.distributed.tensor import DTensor, Shard

from qwen35 import ops
from qwen35.model.moe import Experts


def expert_parallel_mesh(device_type: str, ep: int) -> DeviceMesh:
    world = dist.get_world_size()
    if world % ep:
        raise ValueError(f"parallel.ep ({ep}) must divide the number of ranks ({world})")
    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp_mod_ep", "ep"))


class ExpertParallelExperts(Experts):
    """`Experts` whose forward dispatches tokens to the ranks holding their experts. Its
    parameters are DTensors on the `ep` mesh dimension: this rank's experts, global shape [E, ...]."""

    ep_mesh: DeviceMesh

    def forward(self, x_ND, weights_NK, experts_NK):
        group, ep = self.ep_mesh.get_group(), self.ep_mesh.size()
        gate_up, down = (_ScaleGrad.apply(w.to_local() if isinstance(w, DTensor) else w, 1.0 / ep)
                         for w in (self.gate_up_proj, self.down_proj))
        num_local, top_k = gate_up.shape[0], experts_NK.shape[1]

        choice = experts_NK.flatten()
        order = choice.argsort(stable=True)  # token copies grouped by expert, hence by rank
        token = order // top_k
        sent_per_expert = torch.bincount(choice, minlength=num_local * ep)
        received_per_expert = torch.empty_like(sent_per_expert)  # [source rank, local expert]
        dist.all_to_all_single(received_per_expert, sent_per_expert, group=group)
        send = sent_per_expert.view(ep, num_local).sum(1).tolist()
        receive = received_per_expert.view(ep, num_local).sum(1).tolist()

        rows_MD = _exchange(x_ND[token], receive, send, group)
        local_expert = torch.arange(num_local, device=x_ND.device).repeat(ep)
        local_expert = local_expert.repeat_interleave(received_per_expert)[:, None]  # [M, 1]
        ones = torch.ones(local_expert.shape, dtype=weights_NK.dtype, device=x_ND.device)
        y_MD = ops.routed_experts(rows_MD, ones, local_expert, gate_up, down)
        y_CD = _exchange(y_MD, send, receive, group)  # back in `order`
        y_CD = y_CD * weights_NK.flatten()[order, None].to(y_CD.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token, y_CD.to(x_ND.dtype))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times `scale`. The trainer's data-parallel convention: each rank
    backpropagates its share of the loss times the number of data-parallel ranks, and FSDP
    averages. A local expert's gradient arrives summed over the ep group's ranks by the
    all-to-all's backward, so it is ep shares, where FSDP's average over `dp_mod_ep` expects one."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _exchange(rows: torch.Tensor, receive: list[int], send: list[int], group) -> torch.Tensor:
    """Sends `send[r]` rows to rank r of the group, receives `receive[r]` from it; differentiable
    (its backward is the reverse exchange)."""
    out = all_to_all_single_autograd(rows.contiguous(), receive, send, group)
    return wait_tensor(out) if isinstance(out, AsyncCollectiveTensor) else out


def apply_expert_parallel(model: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:
    """Keeps this rank's experts of every MoE layer (a full model built the same on every rank,
    or on the meta device before loading) and swaps in the dispatching forward."""
    ep_mesh = mesh["ep"]
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    if not experts:
        raise ValueError("parallel.ep > 1 needs an MoE model (num_experts > 0 in its config)")
    for module in experts:
        num_experts = module.gate_up_proj.shape[0]
        if num_experts % ep:
            raise ValueError(f"parallel.ep ({ep}) must divide the number of experts ({num_experts})")
        per_rank = num_experts // ep
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(module, name)
            mine = full.detach()[rank * per_rank:(rank + 1) * per_rank].clone()
            local = DTensor.from_local(mine, ep_mesh, [Shard(0)], run_check=False)
            setattr(module, name, torch.nn.Parameter(local, requires_grad=full.requires_grad))
        module.__class__ = ExpertParallelExperts
        module.ep_mesh = ep_mesh
    return model


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """The global gradient norm, and clipping to it, over parameters sharded on different meshes
    (torch's version stacks per-mesh norms, which DTensors on different meshes refuse). Every
    parameter here is a DTensor whose shards are disjoint across all ranks (FSDP over all ranks,
    or experts over (dp_mod_ep, ep)), so the squared norms of the local shards sum to the total."""
    grads = [p.grad for p in parameters if p.grad is not None]
    locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    assert all(isinstance(g, DTensor) for g in grads), "every parameter is sharded under expert parallelism"
    squared = sum((g.float().square().sum() for g in locals_), torch.zeros((), device=locals_[0].device))
    dist.all_reduce(squared)
    norm = squared.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in locals_:
        g.mul_(scale.to(g.dtype))
    return norm
