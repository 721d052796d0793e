"""Causal softmax attention over packed rows, torch reference.

q `[B, T, H, D]`, k and v `[B, T, Hkv, D]` (grouped-query: query head h reads kv head
`h // (H // Hkv)`). With `cu_seqlens` the row is block-diagonal causal: a token sees only the
earlier tokens of its own document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.ops.segments import pad_documents, unpad_documents


def causal_attention(q, k, v, cu_seqlens=None, scale=None):
    """The op behind the seam. Returns `[B, T, H, D]`."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:  # one document per batch row; causal attention never reaches the padding after it
        (q, index), (k, _), (v, _) = (pad_documents(x.transpose(1, 2), cu_seqlens) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=scale)
        out = unpad_documents(out.transpose(1, 2), index).transpose(1, 2)
    return out.transpose(1, 2)


def cached_attention(q, k_cache, v_cache, lengths, scale=None):
    """Attention of new tokens against a cache (generation).

    q `[B, T, H, D]` are the newest T tokens of each sequence; `k_cache`/`v_cache`
    `[B, L, Hkv, D]` already hold them; sequence b's valid keys are `[0, lengths[b])`. Query i of
    sequence b sits at position `lengths[b] - T + i` and sees the keys up to it.
    """
    groups = q.shape[2] // k_cache.shape[2]
    steps = q.shape[1]
    key_pos = torch.arange(k_cache.shape[1], device=q.device)
    query_pos = lengths[:, None] - steps + torch.arange(steps, device=q.device)
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, T, L]
    k, v = (x.transpose(1, 2).repeat_interleave(groups, dim=1) for x in (k_cache, v_cache))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)
