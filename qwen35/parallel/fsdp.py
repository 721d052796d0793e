"""FSDP2 over the data-parallel ranks, applied to a built (or meta) model from outside.

Each decoder layer (and each block of a vision tower) is its own `fully_shard` unit (its weights are gathered just before it runs
and freed after), and the root holds the embedding, final norm and head (one unit, so a tied
embedding and head stay one parameter). Parameters, gradients and optimizer state are float32
shards; the reduce-scatter of gradients runs in float32. Compute runs in bf16 through autocast,
not through FSDP's `param_dtype`: that cast would round `A_log` and the GDN norm weight, which
must stay float32 (DESIGN §3), while autocast leaves them to the float32 element-wise ops that
use them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from qwen35.parallel.checkpointing import decoder_layers


def data_parallel_mesh(device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",))


def apply_fsdp(model: torch.nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True,
               cpu_offload: bool = False, expert_mesh: DeviceMesh | None = None) -> torch.nn.Module:
    """`expert_mesh` (expert parallelism, `qwen35.parallel.expert`): the routed experts, already
    split over its `ep` dimension, become their own unit sharded over `dp_mod_ep`."""
    policy = dict(
        reshard_after_forward=reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    )
    for layer in decoder_layers(model):
        if expert_mesh is not None and getattr(layer, "is_moe", False):
            fully_shard(layer.mlp.experts, mesh=expert_mesh["dp_mod_ep"], **policy)
        fully_shard(layer, mesh=mesh, **policy)
    if hasattr(model.model, "visual"):  # a vision-language model: each vision block its own unit too
        for block in model.model.visual.blocks:
            fully_shard(block, mesh=mesh, **policy)
        model.model.run_vision_without_media = True  # every rank runs the blocks' collectives
    fully_shard(model, mesh=mesh, **policy)
    return model


@contextlib.contextmanager
def gathered_for_decoding(model: torch.nn.Module, reshard_after_forward: bool = True) -> Iterator[None]:
    """Inside the block every rank holds the whole model, gathered once: decoding (GRPO's
    rollouts) runs as many forwards as it has tokens to sample, and ranks stop at different
    lengths, so a per-forward all-gather would both repeat the traffic at every token and hang
    the ranks that finished. The full weights must fit beside the rollout's cache (a GRPO run of
    a size that does not fit gathers per layer in a rollout engine of its own). A no-op for a
    model that is not sharded.

    One 1-token forward with resharding switched off gathers every unit and keeps it gathered
    (it also performs FSDP's lazy set-up, which a decoding loop that calls submodules would
    otherwise leave to the first layer); afterwards each unit is resharded and its setting
    restored (the root keeps its weights after forward, as FSDP sets it)."""
    if not isinstance(model, FSDPModule):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False, recurse=True)
    with torch.no_grad():
        device = next(p for p in model.parameters()).device
        model(torch.zeros(1, 1, dtype=torch.long, device=device))
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            if unit is not model:
                unit.set_reshard_after_forward(reshard_after_forward, recurse=False)
