"""Context parallelism for the Gated DeltaNet layers, applied to a built model from outside.

Like `qwen35.parallel.sequence`, the `cp` ranks of a group read the same packed row and each keeps
a contiguous 1/cp of its tokens. Unlike it, a GDN layer never gathers the row: each rank runs the
conv and the delta rule on its own slice, and what crosses a slice border is fixed in size,
whatever the row length: the previous rank's last K-1 conv inputs, and one recurrent state per
head `[Dk, Dv]` (with one transition matrix `[Dk, Dk]` for a slice that a single document spans).

The state is linear in the state it starts from. Per token, `S <- exp(g)(I - beta k k^T) S +
beta k v^T`, so a slice run from S_in ends in `M S_in + S(0)`, where S(0) is the run from zero and
M the product of the tokens' `exp(g)(I - beta k k^T)`, which is the same delta rule run from
`I` with v = 0. Every rank computes (M_r, S_r(0)) for the document that leaves its slice, all
ranks gather them, and each rank composes the states entering it with a prefix over the ranks
before it; then it runs its slice once more from that state. docs/parallel.md has the derivation.

Softmax attention layers (one in four) keep their slice of the queries and all-gather the keys
and values of the row (grouped-query attention: the kv heads are a fraction of the query heads,
a quarter in the 0.8B to 9B, so that is the smaller part), then attend, document by document, from the slice's queries to
the keys of each document up to the slice's end. No head count has to divide by cp.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from qwen35 import ops
from qwen35.parallel.sequence import gather_rows, shard_rows


def _cut(bounds: list[int], start: int, end: int) -> list[int]:
    """Document boundaries of the global row cut to the window [start, end), window-relative (a
    window that starts before the row has that part as a document of its own: 0 is a bound)."""
    return [0, *(b - start for b in bounds if start < b < end), end - start]


def _state_entering(rank: int, size: int, bounds: list[int], slice_len: int, transitions, states):
    """The state of the document entering slice `rank`: over the borders before it, a document
    that runs across border j leaves slice j in `M_j S_in(j) + S_j(0)`, with `M_j S_in(j)` only
    when that document also entered slice j (it spans the whole slice)."""
    entering = torch.zeros_like(states[0])
    for j in range(rank):
        start, end = j * slice_len, (j + 1) * slice_len
        spans = all(not start < b < end for b in bounds) and start not in bounds
        crossing = end not in bounds
        carried = transitions[j] @ entering if spans else 0
        entering = carried + states[j] if crossing else torch.zeros_like(entering)
    return entering


def _mix(layer, group, qkv_BTC, beta, g, conv_weight_CK, cu_seqlens=None, cache=None):
    if cache is not None:
        raise ValueError("generation (an inference cache) does not run under context parallelism")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, slice_len, _ = qkv_BTC.shape
    if batch != 1:
        raise ValueError("context parallelism runs packed rows (a batch of one)")
    start, end = rank * slice_len, (rank + 1) * slice_len
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, size * slice_len]
    to_cu = functools.partial(torch.tensor, dtype=torch.int32, device=qkv_BTC.device)

    # the conv reads K-1 inputs back: the previous rank's last ones (rank 0: an empty document)
    halo = conv_weight_CK.shape[1] - 1
    tails = gather_rows(qkv_BTC[0, -halo:], group)
    before = tails[(rank - 1) * halo:rank * halo] if rank else 0 * tails[:halo]  # kept in the graph (above)
    window = torch.cat([before[None], qkv_BTC], dim=1)
    conv, _ = ops.causal_conv1d(window, conv_weight_CK, to_cu(_cut(bounds, start - halo, end)))
    key_dim = layer.num_k_heads * layer.head_k_dim
    q, k, v = conv[:, halo:].split((key_dim, key_dim, conv.shape[-1] - 2 * key_dim), dim=-1)
    q, k = (x.unflatten(-1, (layer.num_k_heads, layer.head_k_dim)) for x in (q, k))
    v = v.unflatten(-1, (layer.num_v_heads, layer.head_v_dim))

    # what this slice passes on: the run of its last document from zero, and from I with v = 0
    local = _cut(bounds, start, end)
    last = slice(local[-2], None)
    # Both exchanges are collectives in the backward too, so every rank must reach them there in
    # the same order: the states always hang on this slice's keys (so the states' backward comes
    # before the conv inputs'), and the output always on the gathered states (so no rank skips it).
    anchor = 0 * k.sum()
    state = anchor + q.new_zeros(layer.num_v_heads, layer.head_k_dim, layer.head_v_dim, dtype=torch.float32)
    transition = anchor + q.new_zeros(layer.num_v_heads, layer.head_k_dim, layer.head_k_dim, dtype=torch.float32)
    if end not in bounds:
        piece = [x[:, last] for x in (q, k, v, g, beta)]
        state = anchor + ops.gated_delta_rule(*piece, output_final_state=True)[1][0]
        if len(local) == 2 and start not in bounds:  # one document spans the slice
            identity = torch.eye(layer.head_k_dim, device=q.device).expand_as(transition)[None]
            zero_v = piece[2].new_zeros(*piece[2].shape[:-1], layer.head_k_dim)
            transition = anchor + ops.gated_delta_rule(piece[0], piece[1], zero_v, *piece[3:], None, identity, True)[1][0]
    # one exchange for both, so the backward has one collective here, not two in some order
    exchanged = gather_rows(torch.cat([state.flatten(), transition.flatten()])[None], group)
    states = exchanged[:, :state.numel()].view(size, *state.shape)
    transitions = exchanged[:, state.numel():].view(size, *transition.shape)

    initial = None
    if start not in bounds:  # the first document began on an earlier rank
        entering = _state_entering(rank, size, bounds, slice_len, transitions, states)
        initial = torch.cat([entering[None], entering.new_zeros(len(local) - 2, *entering.shape)])
    o, _ = ops.gated_delta_rule(q, k, v, g, beta, to_cu(local), initial)
    return o + 0 * exchanged.sum().to(o.dtype)


def _attend(attention, group, q, k, v, cu_seqlens=None):
    """This slice's queries `[1, T/cp, H, D]` against the keys and values of the whole row up to
    the slice's end, gathered from every rank: for each document in the slice, the keys from the
    document's start (on this or an earlier rank) on."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, slice_len = q.shape[:2]
    if batch != 1:
        raise ValueError("context parallelism runs packed rows (a batch of one)")
    start, end = rank * slice_len, (rank + 1) * slice_len
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, size * slice_len]
    kv = gather_rows(torch.cat([k[0], v[0]], dim=1), group)  # [T, 2 Hkv, D], one collective
    first = max(b for b in bounds if b <= start)  # where the document entering the slice began
    k_row, v_row = kv[None, first:end].chunk(2, dim=2)
    local = _cut(bounds, start, end)
    keys = [0, *(b + start - first for b in local[1:])]  # the first document's keys reach back
    to_cu = functools.partial(torch.tensor, dtype=torch.int32, device=q.device)
    max_q = max(b - a for a, b in zip(local, local[1:]))
    max_k = max(b - a for a, b in zip(keys, keys[1:]))
    return ops.attention_to_keys(q, k_row, v_row, to_cu(local), to_cu(keys), max_q, max_k)


def apply_context_parallel(model: torch.nn.Module, group) -> torch.nn.Module:
    """Makes a `Qwen35ForCausalLM` context-parallel over the ranks of `group` (in place; before
    activation checkpointing, compile and FSDP): GDN layers pass states, attention layers gather
    keys and values."""
    return shard_rows(model, group, _mix, _attend)
