import pytest
import torch

from qwen35.ops.delta_rule import chunked_gated_delta_rule, gated_delta_rule, recurrent_gated_delta_rule
from qwen35.ops.slicing import gated_delta_rule_in_slices


def _inputs(length, batch=2, key_heads=2, value_heads=4, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, key_heads, dim, generator=gen)
    k = torch.randn(batch, length, key_heads, dim, generator=gen)
    v = torch.randn(batch, length, value_heads, dim, generator=gen)
    g = -torch.rand(batch, length, value_heads, generator=gen) * 1.5
    beta = torch.rand(batch, length, value_heads, generator=gen)
    return q, k, v, g, beta


@pytest.mark.parametrize("from_zero", [False, True])
@pytest.mark.parametrize("length", [1, 17, 64, 100, 129])
def test_chunked_equals_recurrent(length, from_zero):
    """From a zero state the first chunk skips the part that multiplies the state."""
    q, k, v, g, beta = _inputs(length)
    state0 = None if from_zero else torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    o_chunk, s_chunk = chunked_gated_delta_rule(q, k, v, g, beta, state0, chunk_size=16)
    o_rec, s_rec = recurrent_gated_delta_rule(q, k, v, g, beta, state0)
    assert (o_chunk - o_rec).abs().max().item() <= 1e-5
    assert (s_chunk - s_rec).abs().max().item() <= 1e-5


def test_chunked_gradients_equal_recurrent():
    inputs = [x.requires_grad_() for x in _inputs(37, batch=1)]
    grads = []
    for fn in (chunked_gated_delta_rule, recurrent_gated_delta_rule):
        out, state = fn(*inputs)
        grads.append(torch.autograd.grad(out.sum() + state.sum(), inputs))
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("lengths", [(30, 1, 59), (70, 3)])
def test_packed_documents_do_not_share_state(lengths):
    """Documents within one chunk (from a zero state: one solve), and one over two chunks."""
    inputs = [x.requires_grad_() for x in _inputs(sum(lengths), batch=1)]
    bounds = torch.tensor([0, *lengths]).cumsum(0)
    packed, states = gated_delta_rule(*inputs, bounds.to(torch.int32), output_final_state=True)
    weights = torch.randn(packed.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((packed * weights).sum() + states.sum(), inputs)
    alone_loss = 0
    for i, (s, e) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        alone, state = recurrent_gated_delta_rule(*(x[:, s:e] for x in inputs))
        assert (packed[:, s:e] - alone).abs().max().item() <= 1e-5
        assert (states[i] - state[0]).abs().max().item() <= 1e-5
        alone_loss = alone_loss + (alone * weights[:, s:e]).sum() + state.sum()
    for a, b in zip(grads, torch.autograd.grad(alone_loss, inputs)):
        assert (a - b).abs().max().item() <= 1e-5


def test_continuing_from_a_state_equals_one_pass():
    q, k, v, g, beta = _inputs(50)
    full, _ = gated_delta_rule(q, k, v, g, beta)
    head, state = gated_delta_rule(q[:, :20], k[:, :20], v[:, :20], g[:, :20], beta[:, :20], output_final_state=True)
    tail, _ = gated_delta_rule(q[:, 20:], k[:, 20:], v[:, 20:], g[:, 20:], beta[:, 20:], initial_state=state)
    assert (torch.cat([head, tail], dim=1) - full).abs().max().item() <= 1e-5


# --- slice by slice (the longest-context mode): the same as the whole row ---------------------


def _output_and_grads(run, inputs):
    o = run(*inputs)
    weights = torch.randn(o.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((o * weights).sum(), inputs)
    return o, grads


@pytest.mark.parametrize("slice_tokens", [16, 20, 7, 100])
def test_packed_row_in_slices_equals_the_whole_row(slice_tokens):
    # documents of 20, 13, 1, 36 and 30 tokens: borders at 16 / 20 / 7 cut them, one spans 3+ slices
    cu = torch.tensor([0, 20, 33, 34, 70, 100], dtype=torch.int32)
    inputs = [x.requires_grad_() for x in _inputs(100, batch=1)]
    whole = _output_and_grads(lambda *x: gated_delta_rule(*x, cu)[0], inputs)
    sliced = _output_and_grads(
        lambda *x: gated_delta_rule_in_slices(gated_delta_rule, *x, cu, slice_tokens), inputs)
    torch.testing.assert_close(sliced[0], whole[0], rtol=1e-5, atol=1e-5)
    for name, a, b in zip("q k v g beta".split(), sliced[1], whole[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_plain_batch_in_slices_equals_the_whole_batch():
    inputs = [x.requires_grad_() for x in _inputs(50, batch=2)]
    whole = _output_and_grads(lambda *x: gated_delta_rule(*x)[0], inputs)
    sliced = _output_and_grads(lambda *x: gated_delta_rule_in_slices(gated_delta_rule, *x, None, 12), inputs)
    torch.testing.assert_close(sliced[0], whole[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(sliced[1], whole[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_slices_really_start_from_the_carried_state():
    """Dropping the carried state must change the result (the test above would not see a no-op)."""
    cu = torch.tensor([0, 40], dtype=torch.int32)
    inputs = _inputs(40, batch=1)
    whole = gated_delta_rule(*inputs, cu)[0]

    def forgetful(q, k, v, g, beta, cu_seqlens, initial_state=None, output_final_state=False):
        return gated_delta_rule(q, k, v, g, beta, cu_seqlens, None, output_final_state)

    sliced = gated_delta_rule_in_slices(forgetful, *inputs, cu, 16)
    assert not torch.allclose(sliced[:, 16:], whole[:, 16:], atol=1e-3)
    torch.testing.assert_close(sliced[:, :16], whole[:, :16])


def test_decoding_step_updates_the_state_in_place_as_the_recurrence_does():
    from qwen35.ops.delta_rule import gated_delta_rule_step_, recurrent_gated_delta_rule

    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(3, 1, 2, 8, generator=gen) for _ in range(2))
    v = torch.randn(3, 1, 4, 8, generator=gen)
    g, beta = -torch.rand(3, 1, 4, generator=gen), torch.rand(3, 1, 4, generator=gen)
    state = torch.randn(3, 4, 8, 8, generator=gen)
    o_ref, final_ref = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    buffer = state.clone()
    o = gated_delta_rule_step_(q, k, v, g, beta, buffer)
    assert torch.equal(o, o_ref) and torch.equal(buffer, final_ref)
