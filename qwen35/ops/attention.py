"""Softmax attention over packed rows, torch reference.

q `[B, T, H, D]`, k and v `[B, T, Hkv, D]` (grouped-query: query head h reads kv head
`h // (H // Hkv)`). With `cu_seqlens` the row is block-diagonal: a token sees only the
tokens of its own document, the earlier ones when causal (text), all of them when not (the
patches of one image frame in the vision tower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.ops.segments import pad_documents, unpad_documents


def causal_attention(q, k, v, cu_seqlens=None, scale=None, causal=True):
    """The op behind the seam. Returns `[B, T, H, D]`."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    else:  # one document per batch row
        (q, index), (k, _), (v, _) = (pad_documents(x.transpose(1, 2), cu_seqlens) for x in (q, k, v))
        # causal attention never reaches the padding after a document; the non-causal kind is
        # kept from it by a key mask
        mask = None
        if not causal:
            counts = cu_seqlens[1:] - cu_seqlens[:-1]
            mask = (torch.arange(k.shape[1], device=k.device) < counts[:, None].to(k.device))[:, None, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=causal, scale=scale)
        out = unpad_documents(out.transpose(1, 2), index).transpose(1, 2)
    return out.transpose(1, 2)


def attention_to_keys(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q=None, max_k=None, scale=None):
    """Causal attention of the last tokens of each document to all of its keys so far.

    q `[1, Tq, H, D]`, k and v `[1, Tk, Hkv, D]` are packed rows with the same number of
    documents; document n has `lq` queries and `lk >= lq` keys, and its queries are the last `lq`
    of its `lk` tokens: query i sits at key position `i + lk - lq` and sees the keys up to it
    (flash attention's bottom-right causal alignment). Context parallelism runs a rank's slice of
    the queries against the keys of the row up to its slice's end this way. `max_q`/`max_k` (the
    longest document of each, host ints) are for the fast op; the reference reads them itself.
    Returns `[1, Tq, H, D]`.
    """
    groups = q.shape[2] // k.shape[2]
    (q, index), (k, _), (v, _) = (pad_documents(x, cu) for x, cu in ((q, cu_seqlens_q), (k, cu_seqlens_k), (v, cu_seqlens_k)))
    q_len = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(q.device)
    k_len = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(q.device)
    query_pos = torch.arange(q.shape[1], device=q.device)[None, :, None] + (k_len - q_len)[:, None, None]
    key_pos = torch.arange(k.shape[1], device=q.device)[None, None, :]
    mask = (key_pos <= query_pos) & (key_pos < k_len[:, None, None])  # [N, Lq, Lk]; key 0 always
    k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=scale)
    return unpad_documents(out.transpose(1, 2), index)


def cached_attention(q, k_cache, v_cache, lengths, scale=None):
    """Attention of new tokens against a cache (generation).

    q `[B, T, H, D]` are the newest T tokens of each sequence; `k_cache`/`v_cache`
    `[B, L, Hkv, D]` already hold them; sequence b's valid keys are `[0, lengths[b])`. Query i of
    sequence b sits at position `lengths[b] - T + i` and sees the keys up to it.

    The query heads of one kv head are laid out as that head's queries (`[B, Hkv, G*T, D]`), so
    the cache is read as it is stored: repeating it per query head would copy all of it, at every
    step, for every attention layer (gigabytes at a few hundred sequences of a few thousand tokens).
    """
    batch, steps, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    groups = heads // kv_heads
    key_pos = torch.arange(k_cache.shape[1], device=q.device)
    query_pos = lengths[:, None] - steps + torch.arange(steps, device=q.device)
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, T, L]
    # query row (g, t) of kv head h is query head h * G + g at step t
    q = q.view(batch, steps, kv_heads, groups, dim).permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * steps, dim)
    mask = mask[:, None, None].expand(-1, 1, groups, -1, -1).reshape(batch, 1, groups * steps, -1)
    k, v = (x.transpose(1, 2) for x in (k_cache, v_cache))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, G*T, D]
    return out.view(batch, kv_heads, groups, steps, dim).permute(0, 3, 1, 2, 4).reshape(batch, steps, heads, dim)
