"""The short causal conv + SiLU of the GDN layers in Triton: a training op and a decoding step.

`causal_conv1d_silu(x_NC, weight_CK, positions_N)` is the reference's conv (`qwen35.ops.conv`)
over N tokens of C channels, tap j of output t reading x[t - j] only where `positions[t] >= j`
(t's index in its document, so no tap crosses a document boundary), SiLU after, in float32.
It is a `torch.library.custom_op` with its backward registered: torch.compile keeps it in a
decoder layer's graph as one opaque call (no graph break), one kernel forward and one backward.
Not a `triton_op`: inductor would then analyse which inputs each kernel writes, and with torch
2.11 and triton 3.7 (the pair fla needs on Hopper) that analysis fails and inductor copies every
input of every call. `qwen35.ops.fast` calls it (through `causal_conv1d`, the `[B, T, C]` form)
for every conv without states, eager or traced; fla's conv serves the calls with states.

The backward recomputes the pre-activation instead of saving it. A program (a run of token
blocks, a block of channels) takes its blocks in turn: it computes dacc = dy * silu'(acc) once
for the block's tokens and the TAPS - 1 after it (acc recomputed from x), parks it in its own
float32 scratch tile (cache-resident; a barrier orders the writes before the reads), then reads
it shifted by each tap for dx[s] = sum_j w[:, K-1-j] * dacc[s + j] and for its share of the
weight gradient, `sum_s x[s] * dacc[s + j]`; a sum over the (at most 256) programs along the
tokens finishes it. Timings against fla's conv: docs/gpu.md.

Offsets are 64-bit: a 1M-token row of 6,144 channels has more than 2^31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35.ops.segments import positions_in_documents

BLOCK_T, BLOCK_C = 32, 128  # forward and backward tiles: tokens x channels
MAX_TOKEN_PROGRAMS = 256  # backward programs along the tokens, each summing its blocks' weight gradient


@triton.jit
def _pre_activation(x_ptr, w_ptr, t, pos, t_ok, c, c_ok, channels, TAPS: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """float32 `sum_j w[c, K-1-j] * x[t - j]` over the taps that stay in t's document (`pos`)."""
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(TAPS):
        ok = (t_ok & (pos >= j))[:, None] & c_ok[None, :]
        xv = tl.load(x_ptr + (t - j)[:, None] * channels + c[None, :], mask=ok, other=0.0)
        wv = tl.load(w_ptr + c * TAPS + (TAPS - 1 - j), mask=c_ok, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc


@triton.jit
def causal_conv1d_silu_fwd_kernel(x_ptr, w_ptr, pos_ptr, y_ptr, tokens, channels, TAPS: tl.constexpr,
                                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok, c_ok = t < tokens, c < channels
    pos = tl.load(pos_ptr + t, mask=t_ok, other=0)
    acc = _pre_activation(x_ptr, w_ptr, t, pos, t_ok, c, c_ok, channels, TAPS, BLOCK_T, BLOCK_C)
    y = acc * tl.sigmoid(acc)
    tl.store(y_ptr + t[:, None] * channels + c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _silu_grad(x_ptr, w_ptr, pos_ptr, dy_ptr, u, c, c_ok, tokens, channels, TAPS: tl.constexpr,
               ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """float32 dacc = dy * silu'(acc) at tokens `u` (0 past the last token)."""
    u_ok = u < tokens
    pos = tl.load(pos_ptr + u, mask=u_ok, other=0)
    acc = _pre_activation(x_ptr, w_ptr, u, pos, u_ok, c, c_ok, channels, TAPS, ROWS, BLOCK_C)
    dy = tl.load(dy_ptr + u[:, None] * channels + c[None, :], mask=u_ok[:, None] & c_ok[None, :], other=0.0)
    sig = tl.sigmoid(acc)
    return dy.to(tl.float32) * sig * (1.0 + acc * (1.0 - sig))


@triton.jit
def causal_conv1d_silu_bwd_kernel(x_ptr, w_ptr, pos_ptr, dy_ptr, dx_ptr, dw_ptr, scratch_ptr, tokens, channels,
                                  blocks_per_program, TAPS: tl.constexpr, TAPS_P2: tl.constexpr,
                                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx of `blocks_per_program` consecutive token blocks, and their summed weight gradient
    `dw[program, c, tap]` (float32). `scratch` holds each program's dacc tile: BLOCK_T + TAPS_P2
    rows (the block and the tokens after it that read it) of BLOCK_C."""
    program = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    taps = tl.arange(0, TAPS_P2)
    rows, after, cols = tl.arange(0, BLOCK_T), tl.arange(0, TAPS_P2), tl.arange(0, BLOCK_C)
    scratch = scratch_ptr + (program * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * (
        (BLOCK_T + TAPS_P2) * BLOCK_C)
    dw = tl.zeros((BLOCK_C, TAPS_P2), dtype=tl.float32)
    for b in range(blocks_per_program):
        first = (program.to(tl.int64) * blocks_per_program + b) * BLOCK_T
        s = first + rows
        s_ok = s < tokens
        dacc_block = _silu_grad(x_ptr, w_ptr, pos_ptr, dy_ptr, s, c, c_ok, tokens, channels, TAPS, BLOCK_T, BLOCK_C)
        dacc_after = _silu_grad(x_ptr, w_ptr, pos_ptr, dy_ptr, first + BLOCK_T + after, c, c_ok, tokens, channels,
                                TAPS, TAPS_P2, BLOCK_C)
        tl.debug_barrier()  # the previous block's reads of the scratch tile are done
        tl.store(scratch + rows[:, None] * BLOCK_C + cols[None, :], dacc_block)
        tl.store(scratch + (BLOCK_T + after)[:, None] * BLOCK_C + cols[None, :], dacc_after)
        tl.debug_barrier()
        xs = tl.load(x_ptr + s[:, None] * channels + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for j in tl.static_range(TAPS):  # output u = s + j reads x[s] through tap j
            u = s + j
            pos_u = tl.load(pos_ptr + u, mask=u < tokens, other=0)
            valid = s_ok & (u < tokens) & (pos_u >= j)
            dacc = tl.load(scratch + (rows + j)[:, None] * BLOCK_C + cols[None, :], mask=valid[:, None], other=0.0)
            wj = tl.load(w_ptr + c * TAPS + (TAPS - 1 - j), mask=c_ok, other=0.0)
            dx += dacc * wj.to(tl.float32)[None, :]
            tap_grad = tl.sum(xs.to(tl.float32) * dacc, axis=0)
            dw += tl.where(taps[None, :] == TAPS - 1 - j, tap_grad[:, None], 0.0)
        tl.store(dx_ptr + s[:, None] * channels + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=s_ok[:, None] & c_ok[None, :])
    tl.store(dw_ptr + (program * channels + c)[:, None] * TAPS + taps[None, :], dw,
             mask=c_ok[:, None] & (taps < TAPS)[None, :])


def causal_conv1d(x_BTC: torch.Tensor, weight_CK: torch.Tensor,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """silu(causal depthwise conv) of a packed row `[1, T, C]` (documents by `cu_seqlens`) or a
    plain batch `[B, T, C]`, without conv states: the op below over every token."""
    batch, length, channels = x_BTC.shape
    if cu_seqlens is None:
        positions = torch.arange(length, device=x_BTC.device, dtype=torch.int32).repeat(batch)
    else:
        positions = positions_in_documents(cu_seqlens, length).to(torch.int32)
    y = causal_conv1d_silu(x_BTC.reshape(batch * length, channels).contiguous(), weight_CK.contiguous(), positions)
    return y.view(batch, length, channels)


@torch.library.custom_op("qwen35::causal_conv1d_silu", mutates_args=())
def causal_conv1d_silu(x_NC: torch.Tensor, weight_CK: torch.Tensor, positions_N: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv) of a packed row `[N, C]` in x's dtype (module docstring)."""
    tokens, channels = x_NC.shape
    y = torch.empty_like(x_NC)
    grid = (triton.cdiv(tokens, BLOCK_T), triton.cdiv(channels, BLOCK_C))
    causal_conv1d_silu_fwd_kernel[grid](
        x_NC, weight_CK, positions_N, y, tokens, channels, TAPS=weight_CK.shape[1], BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    return y


@causal_conv1d_silu.register_fake
def _(x_NC, weight_CK, positions_N):
    return torch.empty_like(x_NC)


def _token_programs(tokens: int) -> tuple[int, int]:
    """(token blocks per backward program, programs along the tokens)."""
    blocks = triton.cdiv(tokens, BLOCK_T)
    per_program = triton.cdiv(blocks, MAX_TOKEN_PROGRAMS)
    return per_program, triton.cdiv(blocks, per_program)


@torch.library.custom_op("qwen35::causal_conv1d_silu_backward", mutates_args=())
def causal_conv1d_silu_backward(dy_NC: torch.Tensor, x_NC: torch.Tensor, weight_CK: torch.Tensor,
                                positions_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx `[N, C]`, the weight gradient's float32 partial sums `[programs, C, K]`)."""
    tokens, channels = x_NC.shape
    taps = weight_CK.shape[1]
    per_program, programs = _token_programs(tokens)
    taps_p2 = triton.next_power_of_2(taps)
    channel_blocks = triton.cdiv(channels, BLOCK_C)
    dx = torch.empty_like(x_NC)
    dw_partial = torch.empty(programs, channels, taps, device=x_NC.device, dtype=torch.float32)
    scratch = torch.empty(programs * channel_blocks * (BLOCK_T + taps_p2) * BLOCK_C, device=x_NC.device,
                          dtype=torch.float32)
    causal_conv1d_silu_bwd_kernel[(programs, channel_blocks)](
        x_NC, weight_CK, positions_N, dy_NC, dx, dw_partial, scratch, tokens, channels, per_program, TAPS=taps,
        TAPS_P2=taps_p2, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    return dx, dw_partial


@causal_conv1d_silu_backward.register_fake
def _(dy_NC, x_NC, weight_CK, positions_N):
    tokens, channels = x_NC.shape
    programs = _token_programs(tokens)[1]
    return torch.empty_like(x_NC), x_NC.new_empty(programs, channels, weight_CK.shape[1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, positions = inputs
    ctx.save_for_backward(x, weight, positions)


def _backward(ctx, dy):
    x, weight, positions = ctx.saved_tensors
    dx, dw_partial = causal_conv1d_silu_backward(dy.contiguous(), x, weight, positions)
    return dx, dw_partial.sum(0).to(weight.dtype), None


causal_conv1d_silu.register_autograd(_backward, setup_context=_setup_context)


@triton.jit
def conv_step_kernel(x_ptr, w_ptr, state_ptr, out_ptr, channels, TAPS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, block of channels): out = silu(sum_j w[c, j] * window[j]) over the window
    `state[b, c, :] + [x[b, c]]`, in float32; then the window shifts left by one, in place (each
    program reads its channels' window before it writes them)."""
    b, block = tl.program_id(0), tl.program_id(1)
    c = block * BLOCK + tl.arange(0, BLOCK)
    mask = c < channels
    row = state_ptr + (b * channels + c) * (TAPS - 1)
    xv = tl.load(x_ptr + b * channels + c, mask=mask)
    acc = xv.to(tl.float32) * tl.load(w_ptr + c * TAPS + TAPS - 1, mask=mask).to(tl.float32)
    previous = tl.load(row, mask=mask)
    acc += previous.to(tl.float32) * tl.load(w_ptr + c * TAPS, mask=mask).to(tl.float32)
    for j in tl.static_range(1, TAPS - 1):
        current = tl.load(row + j, mask=mask)
        acc += current.to(tl.float32) * tl.load(w_ptr + c * TAPS + j, mask=mask).to(tl.float32)
        tl.store(row + j - 1, current, mask=mask)
    tl.store(row + TAPS - 2, xv.to(previous.dtype), mask=mask)
    acc = acc.to(xv.dtype).to(tl.float32)  # rounded like the reference's conv output, then SiLU
    tl.store(out_ptr + b * channels + c, (acc * tl.sigmoid(acc)).to(xv.dtype), mask=mask)
