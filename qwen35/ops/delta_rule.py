"""Gated delta rule, torch reference: the step-by-step recurrence and the chunked form.

Shapes: q, k `[B, T, Hk, Dk]`, v `[B, T, Hv, Dv]`, g (log decay, <= 0) and beta `[B, T, Hv]`,
state `[B, Hv, Dk, Dv]`. Value heads may outnumber key heads: value head j reads key head
`j // (Hv // Hk)`, as in transformers and fla. q and k are L2-normalised here (eps 1e-6, as fla's
`use_qk_l2norm_in_kernel`) and q is scaled by `Dk ** -0.5`. Everything runs in float32.

The recurrence per token t, with the state S `[Dk, Dv]` mapping keys to values:

    S <- exp(g_t) * S                      decay
    u_t = beta_t * (v_t - S^T k_t)         the part of v_t that S does not predict yet (delta rule)
    S <- S + k_t u_t^T                     write it
    o_t = S^T q_t

The chunked form computes the same thing C tokens at a time with matrix products. Inside a
chunk, with Gamma_t = exp(sum_{s<=t} g_s) the decay since the chunk start and S_0 the state
before it, every u_t depends linearly on the earlier u_s of the chunk:

    u_t + beta_t sum_{s<t} (Gamma_t / Gamma_s) (k_t . k_s) u_s = beta_t v_t - beta_t Gamma_t S_0^T k_t

a unit lower-triangular system (I + A) U = W solved in one `solve_triangular`; then

    O   = (Gamma q) S_0 + [causal (Gamma_t / Gamma_s) (q_t . k_s)] U
    S_C = Gamma_C S_0 + sum_s (Gamma_C / Gamma_s) k_s u_s^T

Packed rows (`cu_seqlens`) run document by document from a zero state: no state crosses a
document boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.ops.segments import pad_documents, unpad_documents


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta):
    """float32, heads first `[B, H, T, D]`, key heads repeated to value heads, q/k normalised."""
    groups = v.shape[2] // k.shape[2]
    q, k = (x.repeat_interleave(groups, dim=2) if groups > 1 else x for x in (q, k))
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    q = l2_normalize(q) * q.shape[-1] ** -0.5
    k = l2_normalize(k)
    return q, k, v, g.transpose(1, 2).float(), beta.transpose(1, 2).float()


def _initial(state, q, v):
    if state is not None:
        return state.float()
    b, h, _, dk = q.shape
    return q.new_zeros(b, h, dk, v.shape[-1])


def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None):
    """One token at a time: the definition. Returns (o `[B, T, Hv, Dv]`, final state)."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    state = _initial(initial_state, q, v)
    outputs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t, None, None].exp()
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, :, t]))
        state = state + k[:, :, t, :, None] * u[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, :, t]))
    o = torch.stack(outputs, dim=2) if outputs else v.new_zeros(v.shape)
    return o.transpose(1, 2).to(out_dtype), state


# 48, not fla's 64: on a CPU the pairwise [C, C] products of a chunk are most of the op, and
# short documents (chat turns of a few dozen tokens) each fill one chunk of their own in a
# packed row; 48 cut the built-in run's delta rule by ~12% against 64. Fixed rather than fitted
# to a row's longest document, so that a document's numbers do not depend on its neighbours.
CHUNK_SIZE = 48


def chunked_gated_delta_rule(q, k, v, g, beta, initial_state=None, chunk_size: int = CHUNK_SIZE):
    """The chunked form (see the module docstring). Returns (o `[B, T, Hv, Dv]`, final state)."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    state = _initial(initial_state, q, v)
    length = q.shape[2]
    pad = (-length) % chunk_size
    if pad:  # zero-padded tail: g = 0 and beta = 0 leave the state unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    b, h, total, _ = q.shape
    q, k, v = (x.reshape(b, h, total // chunk_size, chunk_size, -1) for x in (q, k, v))
    g, beta = (x.reshape(b, h, total // chunk_size, chunk_size) for x in (g, beta))

    log_decay = g.cumsum(-1)  # log Gamma_t
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # Gamma_t / Gamma_s for s <= t; the upper triangle is masked before exp so it cannot overflow.
    pair_decay = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, -torch.inf).exp()
    strictly_lower = ((k @ k.transpose(-1, -2)) * pair_decay * beta[..., None]).tril(-1)
    system = strictly_lower + torch.eye(chunk_size, device=q.device)
    attn = (q @ k.transpose(-1, -2)) * pair_decay
    # u = (I + A)^{-1} (beta v - beta Gamma k S_0): split into the part without S_0 (solved for
    # every chunk at once) and the part that multiplies S_0 (applied in the scan). While S_0 is
    # zero (the first chunk without an initial state) the second part is zero and is skipped: a
    # packed row's documents that fit in one chunk need one solve, not two.
    chunks = total // chunk_size
    zero_start = initial_state is None
    u_local = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    if chunks > 1 or not zero_start:
        w = torch.linalg.solve_triangular(
            system, k * (beta * log_decay.exp())[..., None], upper=False, unitriangular=True
        )
        q_decayed = q * log_decay.exp()[..., None]
    k_to_end = k * (log_decay[..., -1:] - log_decay).exp()[..., None]
    chunk_decay = log_decay[..., -1].exp()[..., None, None]

    outputs = []
    for c in range(chunks):
        if c == 0 and zero_start:
            u = u_local[:, :, c]
            outputs.append(attn[:, :, c] @ u)
        else:
            u = u_local[:, :, c] - w[:, :, c] @ state
            outputs.append(q_decayed[:, :, c] @ state + attn[:, :, c] @ u)
        state = state * chunk_decay[:, :, c] + k_to_end[:, :, c].transpose(-1, -2) @ u
    o = torch.stack(outputs, dim=2).reshape(b, h, total, -1)[:, :, :length]
    return o.transpose(1, 2).to(out_dtype), state


def gated_delta_rule(q, k, v, g, beta, cu_seqlens=None, initial_state=None, output_final_state=False):
    """The op behind the seam (see `qwen35.ops`): the chunked form.

    With `cu_seqlens` the inputs are one packed row (`B == 1`); the documents run as a padded
    batch, each from its own state (zero, or `initial_state[i]`), and the final states are per
    document `[N, Hv, Dk, Dv]`. The padding after a document has g = 0 and beta = 0, which leave
    its state untouched. A single token (a decoding step) takes the recurrence: the chunked form
    would pad it to a whole chunk and solve a 48x48 system per head (~200x slower on a CPU).
    """
    if cu_seqlens is None and q.shape[1] == 1:
        o, state = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state)
        return o, (state if output_final_state else None)
    if cu_seqlens is None:
        o, state = chunked_gated_delta_rule(q, k, v, g, beta, initial_state)
        return o, (state if output_final_state else None)
    assert q.shape[0] == 1, "packed rows (cu_seqlens) are passed as a batch of one"
    padded, index = zip(*(pad_documents(x, cu_seqlens) for x in (q, k, v, g, beta)))
    o, state = chunked_gated_delta_rule(*padded, initial_state)
    return unpad_documents(o, index[0]), (state if output_final_state else None)


def gated_delta_rule_step_(q, k, v, g, beta, state):
    """One decoding step (T == 1) of a plain batch, the state `[B, Hv, Dk, Dv]` (float32) updated
    in place; returns o `[B, 1, Hv, Dv]`. In place so that a decoder keeps one state buffer per
    sequence and a step moves the state once (read, write), not twice (and a CUDA graph can own it)."""
    o, new_state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    state.copy_(new_state)
    return o
