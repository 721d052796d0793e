"""Ulysses sequence parallelism, applied to a built model from outside.

The `sp` ranks of a group read the same packed row; each keeps a contiguous 1/sp of its tokens
(`sp_rank * T/sp` on) through every per-token step: embedding, norms, projections, MLP or MoE,
head and loss. Only the token-mixing steps need the whole row, and they treat each head on its
own, so around them one all-to-all trades the sequence split for a head split:

    [B, T/sp, H, D] on each rank  --all-to-all-->  [B, T, H/sp, D]  --mix-->  --all-to-all-->  back

- softmax attention (`GatedAttention.attend`): q, k, v go in one all-to-all (rank r gets query
  heads r*H/sp.. and kv heads r*Hkv/sp.., which keeps grouped-query pairs together); varlen
  attention runs with the row's global `cu_seqlens`; the output comes back.
- Gated DeltaNet (`GatedDeltaNet.mix`): the conv input channels `[q | k | v]`, beta and the
  decay g go to the full row on local heads; the short conv runs with those heads' rows of its
  weight, the delta rule on those heads; the output comes back.

`cu_seqlens` and positions stay those of the whole row, so documents may straddle the ranks'
slices: the mixers see whole documents, and next-token targets are shifted over the whole row
before it is cut (the last token of a slice is trained on the first token of the next).

Gradients: the collectives are autograd functions (the backward of an all-to-all is the reverse
all-to-all; of the gather of router logits, the sum over ranks of each slice's gradient), so each
rank's backward leaves in its parameters its part of the gradient of its own tokens' loss, and the
sum over the group's ranks is the gradient of the row. FSDP therefore shards over every rank
(dp x sp) and averages over all of them; `qwen35.train.step` scales each rank's loss by the number
of ranks so that the average is the sum. See docs/parallel.md.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from qwen35.model.model import CausalLMOutput, next_token_targets
from qwen35.ops.segments import positions_in_documents


def parallel_mesh(device_type: str, ranks_per_row: int) -> DeviceMesh:
    """world = dp x seq, seq the ranks that share a row (sp or cp); they are consecutive ranks."""
    world = dist.get_world_size()
    assert world % ranks_per_row == 0, (world, ranks_per_row)
    return init_device_mesh(device_type, (world // ranks_per_row, ranks_per_row), mesh_dim_names=("dp", "seq"))


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Chunk i of `x` along `scatter_dim` goes to rank i; the chunks received are concatenated
    along `gather_dim` in rank order."""
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


class _GatherAlongDim0(torch.autograd.Function):
    """All ranks' tensors concatenated along dim 0; the backward sums every rank's gradient of
    the whole and keeps this rank's slice (an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # not in place: autograd may share it
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order, differentiably."""
    return _GatherAlongDim0.apply(x, group)


def to_heads(x_BTHD: torch.Tensor, group) -> torch.Tensor:
    """`[B, T/sp, H, ...]` -> `[B, T, H/sp, ...]`: the whole row, this rank's heads."""
    return _AllToAll.apply(x_BTHD, group, 2, 1)


def to_sequence(x_BTHD: torch.Tensor, group) -> torch.Tensor:
    """`[B, T, H/sp, ...]` -> `[B, T/sp, H, ...]`: this rank's slice, all heads."""
    return _AllToAll.apply(x_BTHD, group, 1, 2)


def attend_over_heads(attention, group, q, k, v, cu_seqlens=None):
    size, heads, kv_heads = dist.get_world_size(group), q.shape[2], k.shape[2]
    # one all-to-all: per rank its query heads then its kv heads, [B, T/sp, sp, heads/sp, D]
    grouped = [x.unflatten(2, (size, x.shape[2] // size)) for x in (q, k, v)]
    local = to_heads(torch.cat(grouped, dim=3).flatten(2, 3), group)
    q, k, v = local.split((heads // size, kv_heads // size, kv_heads // size), dim=2)
    out = type(attention).attend(attention, q, k, v, cu_seqlens)
    return to_sequence(out, group)


def _conv_channels(layer, rank: int, size: int) -> torch.Tensor:
    """This rank's conv channels in `[q | k | v]` order: its heads' channels of each part."""
    key_dim, value_dim = layer.num_k_heads * layer.head_k_dim, layer.num_v_heads * layer.head_v_dim
    parts = [(0, key_dim), (key_dim, key_dim), (2 * key_dim, value_dim)]
    return torch.cat([torch.arange(start + rank * n // size, start + (rank + 1) * n // size)
                      for start, n in parts])


def _mix(layer, group, qkv_BTC, beta, g, conv_weight_CK, cu_seqlens=None, cache=None):
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    key_dim = layer.num_k_heads * layer.head_k_dim
    q, k, v = qkv_BTC.split((key_dim, key_dim, qkv_BTC.shape[-1] - 2 * key_dim), dim=-1)
    # channels grouped per destination rank: [B, T/sp, sp, (q, k, v) of its heads]
    grouped = torch.cat([x.unflatten(-1, (size, x.shape[-1] // size)) for x in (q, k, v)], dim=-1)
    qkv_local = to_heads(grouped, group).flatten(2)
    beta, g = to_heads(beta, group), to_heads(g, group)
    weight = conv_weight_CK[_conv_channels(layer, rank, size).to(conv_weight_CK.device)]
    o = type(layer).mix(layer, qkv_local, beta, g, weight, cu_seqlens, cache)
    return to_sequence(o, group)


def forward_on_slice(model, group, input_ids, position_ids=None, cu_seqlens=None, labels=None, cache=None):
    """`Qwen35ForCausalLM.forward` over the whole row on every rank of the group, each rank
    computing its slice: the loss sums and counts are this rank's tokens'; logits (no labels) are
    gathered whole."""
    if cache is not None:
        raise ValueError("generation (an inference cache) does not run with parallel.sp or parallel.cp")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, length = input_ids.shape
    if length % size:
        raise ValueError(f"a row of {length} tokens does not split over the {size} ranks of parallel.sp/cp: "
                         f"make data.seq_len a multiple of {size}")
    if position_ids is None:
        position_ids = (positions_in_documents(cu_seqlens, length)[None] if cu_seqlens is not None
                        else torch.arange(length, device=input_ids.device)[None].expand(batch, -1))
    part = slice(rank * length // size, (rank + 1) * length // size)
    router_logits = [] if model.config.num_experts and labels is not None else None
    hidden = model.model(input_ids[:, part], position_ids[..., part], cu_seqlens, router_logits=router_logits)
    if labels is None:
        hidden = gather_rows(hidden.transpose(0, 1), group).transpose(0, 1)
        return CausalLMOutput(logits=model.lm_head(hidden))
    targets = next_token_targets(labels, cu_seqlens)[:, part]
    # the router's balance is over the whole row's tokens (as one process computes it)
    router_logits = [gather_rows(logits, group) for logits in router_logits or []]
    return model.loss(hidden, targets, router_logits)


HEAD_COUNTS = ("num_attention_heads", "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads")


def check_heads_divide(config, ranks: int) -> None:
    for key in HEAD_COUNTS:
        if getattr(config, key) % ranks:
            raise ValueError(f"parallel.sp = {ranks} must divide the model's {key} ({getattr(config, key)}): "
                             "each rank mixes whole heads (parallel.cp has no such limit)")


def apply_sequence_parallel(model: torch.nn.Module, group) -> torch.nn.Module:
    """Makes a `Qwen35ForCausalLM` sequence-parallel over the ranks of `group` (in place; before
    activation checkpointing, compile and FSDP). Raises if a head count does not divide."""
    check_heads_divide(model.config, dist.get_world_size(group))
    return shard_rows(model, group, _mix, attend_over_heads)


def shard_rows(model: torch.nn.Module, group, gdn_mix, attend) -> torch.nn.Module:
    """Each rank of `group` runs its slice of every row: attention layers through
    `attend(layer, group, q, k, v, cu_seqlens)`, GDN layers through `gdn_mix(layer, group, *mix
    arguments)`, the loss over its tokens."""
    for layer in model.model.layers:
        if layer.layer_type == "linear_attention":
            layer.linear_attn.mix = functools.partial(gdn_mix, layer.linear_attn, group)
        else:
            layer.self_attn.attend = functools.partial(attend, layer.self_attn, group)
    model.forward = functools.partial(forward_on_slice, model, group)
    return model
