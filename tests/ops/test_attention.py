import pytest
import torch
import torch.nn.functional as F

from qwen35.ops.attention import attention_to_keys, cached_attention, causal_attention


def _qkv(length, batch=1, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, heads, dim, generator=gen),
            torch.randn(batch, length, kv_heads, dim, generator=gen),
            torch.randn(batch, length, kv_heads, dim, generator=gen))


def _explicit(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v with kv heads repeated, written out."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
    mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
    return torch.einsum("bhts,bshd->bthd", scores.masked_fill(~mask, -torch.inf).softmax(-1), v)


def test_gqa_causal_attention_equals_explicit_softmax():
    q, k, v = _qkv(10, batch=2)
    assert torch.allclose(causal_attention(q, k, v), _explicit(q, k, v), atol=1e-6)


def test_packed_attention_is_block_diagonal():
    q, k, v = _qkv(15)
    cu_seqlens = torch.tensor([0, 4, 5, 15], dtype=torch.int32)
    packed = causal_attention(q, k, v, cu_seqlens)
    for s, e in [(0, 4), (4, 5), (5, 15)]:
        assert torch.allclose(packed[:, s:e], _explicit(q[:, s:e], k[:, s:e], v[:, s:e]), atol=1e-6)


def test_packed_non_causal_attention_equals_sdpa_per_document():
    """The vision tower's kind: every patch sees all patches of its frame, none of another."""
    q, k, v = _qkv(15, kv_heads=4)
    cu_seqlens = torch.tensor([0, 6, 7, 15], dtype=torch.int32)
    packed = causal_attention(q, k, v, cu_seqlens, causal=False)
    for s, e in [(0, 6), (6, 7), (7, 15)]:
        alone = F.scaled_dot_product_attention(*(x[:, s:e].transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        assert torch.allclose(packed[:, s:e], alone, atol=1e-6)
    assert not torch.allclose(packed, causal_attention(q, k, v, cu_seqlens), atol=1e-3)


def test_cached_attention_of_ragged_sequences_equals_full_attention():
    q, k, v = _qkv(7, batch=2)
    lengths = torch.tensor([7, 4])  # sequence 1 holds 4 tokens; the rest of its cache is junk
    newest = torch.stack([q[0, 6:7], q[1, 3:4]])
    out = cached_attention(newest, k, v, lengths)
    assert torch.allclose(out[0, 0], _explicit(q[:1], k[:1], v[:1])[0, 6], atol=1e-6)
    assert torch.allclose(out[1, 0], _explicit(q[1:, :4], k[1:, :4], v[1:, :4])[0, 3], atol=1e-6)


@pytest.mark.parametrize("start, end", [(6, 12), (4, 9), (0, 5), (12, 15)])
def test_attention_to_keys_equals_the_slice_of_the_whole_rows_attention(start, end):
    """A slice of a packed row's queries against the keys from its first document's start (an
    earlier slice's tokens included) gives that slice of the whole row's causal attention."""
    q, k, v = _qkv(15)
    bounds = [0, 4, 5, 15]
    whole = causal_attention(q, k, v, torch.tensor(bounds, dtype=torch.int32))
    first = max(b for b in bounds if b <= start)
    local = [0, *(b - start for b in bounds if start < b < end), end - start]
    keys = [0, *(b + start - first for b in local[1:])]
    out = attention_to_keys(q[:, start:end], k[:, first:end], v[:, first:end], torch.tensor(local, dtype=torch.int32),
                            torch.tensor(keys, dtype=torch.int32))
    assert torch.allclose(out, whole[:, start:end], atol=1e-6)
    if first < start:  # the keys before the slice count: without them the result differs
        alone = causal_attention(q[:, start:end], k[:, start:end], v[:, start:end], torch.tensor(local, dtype=torch.int32))
        assert not torch.allclose(alone, whole[:, start:end], atol=1e-3)
