import torch
import torch.nn.functional as F

from qwen35.ops.conv import causal_conv1d, causal_conv1d_step_


def _plain_conv(x, weight):
    """The textbook depthwise causal conv: left-pad by K-1, conv1d, SiLU."""
    taps = weight.shape[1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (taps - 1, 0)), weight[:, None], groups=weight.shape[0])
    return F.silu(out).transpose(1, 2)


def test_unpacked_equals_textbook_conv():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 11, 6, generator=gen), torch.randn(6, 4, generator=gen)
    out, _ = causal_conv1d(x, w)
    assert torch.allclose(out, _plain_conv(x, w), atol=1e-6)


def test_packed_taps_never_cross_a_document_boundary():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 12, 6, generator=gen), torch.randn(6, 4, generator=gen)
    cu_seqlens = torch.tensor([0, 5, 7, 12], dtype=torch.int32)
    out, states = causal_conv1d(x, w, cu_seqlens, output_final_state=True)
    for i, (s, e) in enumerate([(0, 5), (5, 7), (7, 12)]):
        alone, state = causal_conv1d(x[:, s:e], w, output_final_state=True)
        assert torch.allclose(out[:, s:e], alone, atol=1e-6)
        assert torch.allclose(states[i], state[0], atol=1e-6)


def test_state_continues_the_sequence_token_by_token():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 9, 6, generator=gen), torch.randn(6, 4, generator=gen)
    full, _ = causal_conv1d(x, w)
    out, state = causal_conv1d(x[:, :2], w, output_final_state=True)
    steps = [out]
    for t in range(2, 9):
        out, state = causal_conv1d(x[:, t : t + 1], w, initial_state=state, output_final_state=True)
        steps.append(out)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-6)


def test_decoding_steps_shift_the_window_in_place_and_continue_the_sequence():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 9, 6, generator=gen), torch.randn(6, 4, generator=gen)
    full, _ = causal_conv1d(x, w)
    out, state = causal_conv1d(x[:, :2], w, output_final_state=True)
    window, steps = state.clone(), [out]
    for t in range(2, 9):
        steps.append(causal_conv1d_step_(x[:, t : t + 1], w, window))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-6)
    _, final = causal_conv1d(x, w, output_final_state=True)
    assert torch.equal(window, final)  # the last K-1 inputs, exactly
