import torch

from qwen35.ops.attention import cached_attention


def test_cached_attention_equals_attention_over_each_sequence_prefix():
    gen = torch.Generator().manual_seed(0)
    batch, steps, heads, kv_heads, dim, length = 3, 2, 6, 2, 8, 11
    q = torch.randn(batch, steps, heads, dim, generator=gen)
    k = torch.randn(batch, length, kv_heads, dim, generator=gen)
    v = torch.randn(batch, length, kv_heads, dim, generator=gen)
    lengths = torch.tensor([4, 11, 7])
    out = cached_attention(q, k, v, lengths)
    for b in range(batch):
        for t in range(steps):
            seen = int(lengths[b]) - steps + t + 1
            for h in range(heads):
                kv = h // (heads // kv_heads)
                weights = torch.softmax(k[b, :seen, kv] @ q[b, t, h] / dim**0.5, dim=0)
                torch.testing.assert_close(out[b, t, h], weights @ v[b, :seen, kv], rtol=1e-5, atol=1e-6)
