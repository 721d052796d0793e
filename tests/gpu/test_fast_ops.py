"""Every fast op against its torch reference, in bf16, forward and backward.

Packed rows hold several documents whose lengths are not multiples of 64 (fla's chunk), one of
them a single token; GDN has more value heads than key heads. The reference runs in float32 on
the same (bf16-rounded) inputs; the error measure is fla's: rms(fast - ref) / rms(ref).
"""

import pytest
import torch
import torch.nn.functional as F

from reference import relative_error
from qwen35.ops import attention, conv, cross_entropy, delta_rule, moe, norm

pytestmark = pytest.mark.gpu

TOL = 1e-2
DOCS = (37, 200, 1, 130, 95)  # 463 tokens


def assert_all_close(pairs: dict, tol=TOL):
    errors = {name: relative_error(fast, ref) for name, (fast, ref) in pairs.items()}
    print({k: f"{v:.2e}" for k, v in errors.items()})
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative error above {tol}: {bad}"


def cu_seqlens(lengths, device="cuda"):
    return torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)


def leaves(*tensors, dtype=torch.bfloat16):
    """(fast inputs in `dtype`, reference inputs: float32 copies of the same values)."""
    fast = [t.to(dtype).requires_grad_() for t in tensors]
    ref = [t.detach().float().requires_grad_() for t in fast]
    return fast, ref


def grads(outputs, cotangents, inputs):
    loss = sum((o.float() * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs)


def _gdn_inputs(batch, length, key_heads=2, value_heads=4, dim=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, length, key_heads, dim, device="cuda", generator=gen)
    k = torch.randn(batch, length, key_heads, dim, device="cuda", generator=gen)
    v = torch.randn(batch, length, value_heads, dim, device="cuda", generator=gen)
    beta = torch.rand(batch, length, value_heads, device="cuda", generator=gen)
    g = -torch.rand(batch, length, value_heads, device="cuda", generator=gen) * 0.5  # log decay
    return q, k, v, beta, g


def _flash_qla_or_skip():
    pytest.importorskip("tilelang", reason="FlashQLA needs tilelang (pip install flash-qla)")
    pytest.importorskip("flash_qla", reason="FlashQLA is not installed (pip install flash-qla)")
    if torch.cuda.get_device_capability(0)[0] < 9:
        pytest.skip("FlashQLA needs an SM90+ GPU")
    from qwen35.ops import fast_qla

    return fast_qla.gated_delta_rule


@pytest.fixture(params=["fla", "flash_qla"])
def delta_rule_kernel(request, fast_backend):
    """The fast delta rule of each kernel choice (FlashQLA skipped, naming it, where it is absent)."""
    from qwen35.ops import fast

    return fast.gated_delta_rule if request.param == "fla" else _flash_qla_or_skip()


@pytest.mark.parametrize("packed", [True, False])
def test_gated_delta_rule_matches_reference_with_states_and_grouped_values(delta_rule_kernel, packed):
    batch, length = (1, sum(DOCS)) if packed else (2, 150)
    cu = cu_seqlens(DOCS) if packed else None
    states = len(DOCS) if packed else batch
    q, k, v, beta, g = _gdn_inputs(batch, length)
    state0 = torch.randn(states, 4, 128, 128, device="cuda") * 0.1
    (qf, kf, vf, bf), (qr, kr, vr, br) = leaves(q, k, v, beta)
    (gf, sf), (gr, sr) = leaves(g, state0, dtype=torch.float32)

    of, state_f = delta_rule_kernel(qf, kf, vf, gf, bf, cu, sf, True)
    orf, state_r = delta_rule.gated_delta_rule(qr, kr, vr, gr, br, cu, sr, True)
    assert of.shape == orf.shape and state_f.shape == state_r.shape == state0.shape
    do, dstate = torch.randn_like(orf), torch.randn_like(state_r)
    gf_all = grads((of, state_f), (do, dstate), (qf, kf, vf, gf, bf, sf))
    gr_all = grads((orf, state_r), (do, dstate), (qr, kr, vr, gr, br, sr))
    names = ("dq", "dk", "dv", "dbeta")
    assert_all_close({"o": (of, orf), "final_state": (state_f, state_r),
                      **{n: (a, b) for n, a, b in zip(names, gf_all[:3] + gf_all[4:5], gr_all[:3] + gr_all[4:5])}})
    # dg sums over a whole chunk of bf16 products: fla's own tests allow it 2e-2 (measured on an
    # H100: 1.2e-2). fla's tests only warn on dh0; nothing trains through an initial state.
    assert_all_close({"dg": (gf_all[3], gr_all[3])}, tol=2e-2)
    assert_all_close({"dstate0": (gf_all[5], gr_all[5])}, tol=5e-2)


def test_gated_delta_rule_in_slices_matches_the_whole_reference_row(delta_rule_kernel):
    """The longest-context mode's slices: the kernel from carried states (and back through them,
    dh0) against the reference on the whole row. Borders at 128 and 256 cut two documents."""
    from qwen35.ops.slicing import gated_delta_rule_in_slices

    cu = cu_seqlens(DOCS)
    q, k, v, beta, g = _gdn_inputs(1, sum(DOCS))
    (qf, kf, vf, bf), (qr, kr, vr, br) = leaves(q, k, v, beta)
    (gf,), (gr,) = leaves(g, dtype=torch.float32)
    of = gated_delta_rule_in_slices(delta_rule_kernel, qf, kf, vf, gf, bf, cu, 128)
    orf, _ = delta_rule.gated_delta_rule(qr, kr, vr, gr, br, cu)
    do = torch.randn_like(orf)
    gf_all = grads((of,), (do,), (qf, kf, vf, gf, bf))
    gr_all = grads((orf,), (do,), (qr, kr, vr, gr, br))
    assert_all_close({"o": (of, orf), **{n: (a, b) for n, a, b in zip(("dq", "dk", "dv", "dbeta"),
                                                                        gf_all[:3] + gf_all[4:], gr_all[:3] + gr_all[4:])}})
    assert_all_close({"dg": (gf_all[3], gr_all[3])}, tol=2e-2)


def test_the_seam_runs_the_delta_rule_kernel_chosen_and_tells_fla_which():
    """`delta_rule_kernel` routes `ops.gated_delta_rule` and sets fla's own dispatch to match:
    with "fla", fla's Triton kernels run even though flash_qla imports (the two kernels round
    differently, so equal outputs would mean fla had handed the call to FlashQLA)."""
    import os

    from qwen35 import ops
    from qwen35.ops import fast

    qla = _flash_qla_or_skip()
    q, k, v, beta, g = _gdn_inputs(1, sum(DOCS))
    q, k, v, beta = (t.bfloat16() for t in (q, k, v, beta))
    try:
        assert ops.use_backend("fast", delta_rule_kernel="flash_qla") == "fast"
        assert ops.current_delta_rule_kernel() == "flash_qla" and os.environ["FLA_FLASH_QLA"] == "1"
        o_seam, _ = ops.gated_delta_rule(q, k, v, g, beta, cu_seqlens(DOCS))
        o_qla, _ = qla(q, k, v, g, beta, cu_seqlens(DOCS))
        assert torch.equal(o_seam, o_qla)
        ops.use_backend("fast", delta_rule_kernel="fla")
        assert ops.current_delta_rule_kernel() == "fla" and os.environ["FLA_FLASH_QLA"] == "0"
        o_fla, _ = ops.gated_delta_rule(q, k, v, g, beta, cu_seqlens(DOCS))
        o_direct, _ = fast.gated_delta_rule(q, k, v, g, beta, cu_seqlens(DOCS))
        assert torch.equal(o_fla, o_direct) and not torch.equal(o_fla, o_qla)
        assert relative_error(o_fla, o_qla) <= TOL
    finally:
        ops.use_backend("reference")


@pytest.mark.parametrize("kernel", ["ours", "seam", "seam_with_final_state"])
@pytest.mark.parametrize("packed", [True, False])
def test_causal_conv1d_matches_reference(fast_backend, packed, kernel):
    """Our Triton op (`qwen35.ops.fast_conv`) and the seam's conv (our op without states, fla's
    kernel with a final state) against the reference, forward and backward."""
    from qwen35.ops import fast, fast_conv

    docs = (2, *DOCS)  # one document shorter than the conv window
    batch, length = (1, sum(docs)) if packed else (3, 77)
    cu = cu_seqlens(docs) if packed else None
    x = torch.randn(batch, length, 384 + 40, device="cuda")  # channels not a multiple of the block
    weight = torch.randn(384 + 40, 4, device="cuda") * 0.5
    (xf,), (xr,) = leaves(x)
    (wf,), (wr,) = leaves(weight, dtype=torch.float32)
    final_state = kernel == "seam_with_final_state"
    if kernel == "ours":
        yf, final_f = fast_conv.causal_conv1d(xf, wf, cu), None
    else:
        yf, final_f = fast.causal_conv1d(xf, wf, cu, None, final_state)
    yr, final_r = conv.causal_conv1d(xr, wr, cu, None, final_state)
    dy = torch.randn_like(yr)
    (dxf, dwf), (dxr, dwr) = grads((yf,), (dy,), (xf, wf)), grads((yr,), (dy,), (xr, wr))
    pairs = {"y": (yf, yr), "dx": (dxf, dxr), "dw": (dwf, dwr)}
    if final_state:
        assert final_f.shape == final_r.shape
        pairs["final_state"] = (final_f, final_r)
    assert_all_close(pairs)


def test_conv_backward_sums_the_weight_gradient_over_many_token_blocks(fast_backend):
    """A row of more than 256 x 32 tokens: each backward program along the tokens runs several
    blocks and sums their weight gradient; documents cross the blocks' borders."""
    from qwen35.ops import fast_conv

    docs = (5000, 3, 4191)
    assert sum(docs) > fast_conv.MAX_TOKEN_PROGRAMS * fast_conv.BLOCK_T
    x = torch.randn(1, sum(docs), 200, device="cuda")
    weight = torch.randn(200, 4, device="cuda") * 0.5
    (xf,), (xr,) = leaves(x, dtype=torch.float32)
    (wf,), (wr,) = leaves(weight, dtype=torch.float32)
    yf = fast_conv.causal_conv1d(xf, wf, cu_seqlens(docs))
    yr, _ = conv.causal_conv1d(xr, wr, cu_seqlens(docs))
    dy = torch.randn_like(yr)
    (dxf, dwf), (dxr, dwr) = grads((yf,), (dy,), (xf, wf)), grads((yr,), (dy,), (xr, wr))
    assert_all_close({"y": (yf, yr), "dx": (dxf, dxr), "dw": (dwf, dwr)}, tol=1e-5)


@pytest.mark.parametrize("steps", [1, 5])
def test_causal_conv1d_continues_from_a_state_like_the_reference(fast_backend, steps):
    from qwen35.ops import fast

    x = torch.randn(3, steps, 384, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(384, 4, device="cuda") * 0.5
    state = torch.randn(3, 384, 3, device="cuda", dtype=torch.bfloat16)
    yf, final_f = fast.causal_conv1d(x, weight, None, state, True)
    yr, final_r = conv.causal_conv1d(x.float(), weight, None, state.float(), True)
    assert_all_close({"y": (yf, yr), "final_state": (final_f, final_r)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_decoding_steps_match_the_reference_steps(fast_backend, dtype):
    from qwen35.ops import fast

    x = torch.randn(5, 4, 6144 + 40, device="cuda", dtype=dtype)  # channels not a multiple of the block
    weight = torch.randn(6144 + 40, 4, device="cuda") * 0.5
    state_f = torch.randn(5, 6144 + 40, 3, device="cuda", dtype=dtype)
    state_r = state_f.clone()
    for t in range(4):
        yf = fast.causal_conv1d_step_(x[:, t : t + 1], weight, state_f)
        yr = conv.causal_conv1d_step_(x[:, t : t + 1], weight, state_r)
        torch.testing.assert_close(yf, yr, **({} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)))
        assert torch.equal(state_f, state_r), "the window shifts by exactly one input"


def test_gated_rms_norm_matches_reference(fast_backend):
    from qwen35.ops import fast

    x, z = torch.randn(2, 1, 300, 4, 128, device="cuda").unbind(0)
    weight = 1 + 0.3 * torch.randn(128, device="cuda")
    (xf, zf), (xr, zr) = leaves(x, z)
    (wf,), (wr,) = leaves(weight, dtype=torch.float32)
    yf, yr = fast.gated_rms_norm(xf, zf, wf, 1e-6), norm.gated_rms_norm(xr, zr, wr, 1e-6)
    assert yf.dtype == torch.bfloat16 and yf.shape == x.shape
    dy = torch.randn_like(yr)
    gf, gr = grads((yf,), (dy,), (xf, zf, wf)), grads((yr,), (dy,), (xr, zr, wr))
    assert_all_close({"y": (yf, yr), "dx": (gf[0], gr[0]), "dz": (gf[1], gr[1]), "dw": (gf[2], gr[2])})


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("row", ["documents", "one document", "batch"])
def test_causal_attention_matches_reference_with_grouped_kv_and_head_dim_256(fast_backend, row, causal):
    """causal=False is the vision tower's attention (all patches of a frame see each other). A
    row of several documents runs the flash kernel; one document or a plain batch runs cuDNN's
    fused attention on Hopper."""
    from qwen35.ops import fast

    batch, length = {"documents": (1, sum(DOCS)), "one document": (1, 333), "batch": (2, 150)}[row]
    cu = {"documents": cu_seqlens(DOCS), "one document": cu_seqlens((333,)), "batch": None}[row]
    q = torch.randn(batch, length, 8, 256, device="cuda")
    k, v = torch.randn(2, batch, length, 2, 256, device="cuda").unbind(0)
    (qf, kf, vf), (qr, kr, vr) = leaves(q, k, v)
    of = fast.causal_attention(qf, kf, vf, cu, causal=causal)
    orf = attention.causal_attention(qr, kr, vr, cu, causal=causal)
    assert of.shape == orf.shape == q.shape
    do = torch.randn_like(orf)
    gf, gr = grads((of,), (do,), (qf, kf, vf)), grads((orf,), (do,), (qr, kr, vr))
    assert_all_close({"o": (of, orf), "dq": (gf[0], gr[0]), "dk": (gf[1], gr[1]), "dv": (gf[2], gr[2])})


def test_whole_row_attention_split_by_kv_head_equals_the_unsplit_call(fast_backend, monkeypatch):
    """A row too large for one cuDNN call (2^31 elements of q) runs one kv head group at a time;
    the split is exercised here at a small size."""
    from qwen35.ops import fast

    q = torch.randn(1, 200, 8, 256, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 200, 2, 256, device="cuda", dtype=torch.bfloat16).unbind(0)
    cu = cu_seqlens((200,))
    whole = fast.causal_attention(q, k, v, cu)
    monkeypatch.setattr(fast, "_CUDNN_SPLIT_ELEMENTS", q.numel())
    torch.testing.assert_close(fast.causal_attention(q, k, v, cu), whole, rtol=0, atol=0)


def test_attention_to_keys_matches_reference_with_fewer_queries_than_keys(fast_backend):
    """Context parallelism's attention: a slice's queries (the last of their documents) against
    keys from each document's start; flash's bottom-right causal alignment must be what the
    reference spells out."""
    from qwen35.ops import fast

    cu_q = torch.tensor([0, 70, 100, 230], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 300, 330, 460], dtype=torch.int32, device="cuda")  # document 0 began 230 earlier
    q = torch.randn(1, 230, 8, 256, device="cuda")
    k, v = torch.randn(2, 1, 460, 2, 256, device="cuda").unbind(0)
    (qf, kf, vf), (qr, kr, vr) = leaves(q, k, v)
    of = fast.attention_to_keys(qf, kf, vf, cu_q, cu_k, 130, 300)
    orf = attention.attention_to_keys(qr, kr, vr, cu_q, cu_k)
    assert of.shape == orf.shape == q.shape
    do = torch.randn_like(orf)
    gf, gr = grads((of,), (do,), (qf, kf, vf)), grads((orf,), (do,), (qr, kr, vr))
    assert_all_close({"o": (of, orf), "dq": (gf[0], gr[0]), "dk": (gf[1], gr[1]), "dv": (gf[2], gr[2])})


def test_causal_attention_casts_float32_queries_under_autocast(fast_backend):
    """Rotary tables in float32 promote q and k to float32 under autocast; flash wants bf16."""
    from qwen35.ops import fast

    q = torch.randn(1, 300, 4, 256, device="cuda")
    k = torch.randn(1, 300, 2, 256, device="cuda")
    v = torch.randn(1, 300, 2, 256, device="cuda", dtype=torch.bfloat16)
    cu = cu_seqlens((100, 200))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast.causal_attention(q, k, v, cu)
    assert out.dtype == torch.bfloat16
    assert_all_close({"o": (out, attention.causal_attention(q, k, v.float(), cu))})


@pytest.mark.parametrize("autocast", [True, False])
def test_fused_linear_cross_entropy_matches_plain_cross_entropy(fast_backend, autocast):
    pytest.importorskip("liger_kernel", reason="the fused loss needs liger-kernel (pip install liger-kernel)")
    from qwen35.ops import fast

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(700, 64, device="cuda", generator=gen)
    weight = torch.randn(5003, 64, device="cuda", generator=gen) * 0.3
    targets = torch.randint(0, 5003, (700,), device="cuda", generator=gen)
    targets[::9] = -100
    targets[600:] = -100  # a whole chunk of ignored tokens
    hf, wf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    dtype = torch.bfloat16 if autocast else torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss_f = fast.linear_cross_entropy(hf, wf, targets, chunk_tokens=256)
    assert hf.dtype == torch.float32
    hr, wr = hidden.to(dtype).float().requires_grad_(), weight.to(dtype).float().requires_grad_()
    loss_r = cross_entropy.linear_cross_entropy(hr, wr, targets)
    plain = F.cross_entropy(hr.detach() @ wr.detach().T, targets, ignore_index=-100, reduction="sum")
    assert relative_error(loss_r, plain) <= 1e-5
    (loss_f * 0.5).backward()
    (loss_r * 0.5).backward()
    assert hf.grad.dtype == wf.grad.dtype == torch.float32
    assert hf.grad[600:].abs().max().item() == 0.0
    assert_all_close({"loss": (loss_f, loss_r), "dhidden": (hf.grad, hr.grad), "dweight": (wf.grad, wr.grad)})


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fused_linear_cross_entropy_makes_no_weight_gradient_when_gradients_are_off(fast_backend, mode):
    """Evaluation: the loss alone. A float32 vocab x hidden gradient (here 64 MiB) must not be
    allocated, and the loss is the one the training pass computes."""
    pytest.importorskip("liger_kernel", reason="the fused loss needs liger-kernel (pip install liger-kernel)")
    from qwen35.ops import fast

    gen = torch.Generator(device="cuda").manual_seed(0)
    vocab, dim, tokens = 65536, 256, 512
    hidden = torch.randn(tokens, dim, device="cuda", generator=gen).requires_grad_()
    weight = (torch.randn(vocab, dim, device="cuda", generator=gen) * 0.05).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        trained = fast.linear_cross_entropy(hidden, weight, targets, chunk_tokens=256)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()), torch.autocast("cuda", dtype=torch.bfloat16):
        evaluated = fast.linear_cross_entropy(hidden, weight, targets, chunk_tokens=256)
    extra = torch.cuda.max_memory_allocated() - before
    # allowed: one chunk of bf16 logits and autocast's bf16 copy of the weight (32 MiB each),
    # plus slack; a float32 weight gradient would add 64 MiB more
    logits_chunk, bf16_weight = 256 * vocab * 2, vocab * dim * 2
    assert extra < logits_chunk + bf16_weight + 2**24, f"{extra / 2**20:.1f} MiB allocated"
    assert not evaluated.requires_grad
    assert relative_error(evaluated, trained) <= 1e-6


@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_experts_match_the_expert_loop(fast_backend, autocast):
    """bf16 grouped GEMM (bf16 weights, or float32 masters under autocast) against the float32
    loop; 35B-A3B-like proportions, uneven routing, and an expert that gets no token."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden, inter, experts, top_k = 1000, 256, 128, 16, 4
    x = torch.randn(tokens, hidden, device="cuda", generator=gen)
    logits = torch.randn(tokens, experts, device="cuda", generator=gen) + torch.linspace(0, 2, experts, device="cuda")
    logits[:, 5] = -1e4
    weights, chosen = logits.softmax(-1).topk(top_k, dim=-1)
    gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) / hidden**0.5
    down = torch.randn(experts, hidden, inter, device="cuda", generator=gen) / inter**0.5
    fast_in, ref_in = leaves(x, weights, gate_up, down, dtype=torch.float32 if autocast else torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = moe.grouped_experts(fast_in[0], fast_in[1], chosen, fast_in[2], fast_in[3])
    ref = moe.expert_loop(ref_in[0].to(torch.bfloat16).float(), ref_in[1], chosen,
                          ref_in[2].to(torch.bfloat16).float(), ref_in[3].to(torch.bfloat16).float())
    assert out.dtype == fast_in[0].dtype
    cot = torch.randn_like(ref)
    fast_grads = grads([out], [cot], fast_in)
    ref_grads = grads([ref], [cot], ref_in)
    assert fast_grads[2][5].abs().max().item() == 0.0
    assert_all_close({"out": (out, ref), **{f"d{n}": (f, r) for n, f, r in
                      zip(("x", "weights", "gate_up", "down"), fast_grads, ref_grads)}})
