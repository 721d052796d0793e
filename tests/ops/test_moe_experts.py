"""Grouped-GEMM experts against the per-expert loop (CPU, float32: the same grouped_mm op)."""

import torch

from qwen35.ops.moe import expert_loop, grouped_experts


def _inputs(tokens=37, hidden=32, inter=24, experts=6, top_k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen)
    logits[:, 3] = -1e4  # expert 3 gets no token: an empty group
    weights, chosen = logits.softmax(-1).topk(top_k, dim=-1)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    return x, weights, chosen, gate_up, down


def _run(fn, x, weights, chosen, gate_up, down, grad_out):
    leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    out = fn(leaves[0], leaves[1], chosen, leaves[2], leaves[3])
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def test_grouped_experts_equal_the_loop_forward_and_backward():
    x, weights, chosen, gate_up, down = _inputs()
    assert not (chosen == 3).any()
    grad_out = torch.randn_like(x)
    out_loop, grads_loop = _run(expert_loop, x, weights, chosen, gate_up, down, grad_out)
    out_grouped, grads_grouped = _run(grouped_experts, x, weights, chosen, gate_up, down, grad_out)
    torch.testing.assert_close(out_grouped, out_loop, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "weights", "gate_up", "down"), grads_grouped, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert grads_grouped[2][3].abs().max() == 0  # the idle expert gets no gradient


def test_moe_model_on_the_fast_seam_entry_matches_the_loop(tmp_path, monkeypatch):
    """The whole MoE model with the grouped path routed in, against the reference loop."""
    from reference import hf_moe_model, ours_from_hf
    from qwen35 import ops

    model = ours_from_hf(hf_moe_model(), tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    out = model(ids, labels=ids)
    out.loss.backward()
    loop = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setitem(ops._active, "routed_experts", grouped_experts)
    out_grouped = model(ids, labels=ids)
    out_grouped.loss.backward()
    torch.testing.assert_close(out_grouped.loss, out.loss, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, loop[name], rtol=1e-4, atol=1e-6, msg=name)
