"""The fast GPU ops behind the seam: same signatures and semantics as the torch references.

- gated delta rule: flash-linear-attention's `chunk_gated_delta_rule` (varlen through
  `cu_seqlens`, q/k L2-normalised in the kernel, more value than key heads handled natively
  (GVA), initial and final states per document `[N, Hv, Dk, Dv]` in float32). A decoding step
  (a plain batch of one token each) takes fla's `fused_recurrent_gated_delta_rule` instead: one
  kernel, no host sync, so it can be captured in a CUDA graph. `gated_delta_rule_step_` launches
  that kernel itself with the state as both its input and its output: each program reads its tile
  of the state before it writes the same tile, so the update is in place and a step moves the
  recurrent state once (the largest memory traffic of a decode step at a few hundred sequences).
  The launch names fla 0.6.0's kernel arguments; a release whose kernel differs takes fla's
  function and a copy instead.
- causal conv1d + SiLU: without conv states (training), our Triton op (`qwen35.ops.fast_conv`):
  torch.compile keeps it in the layer's graph, where fla's conv was a graph break with its own
  Python launch path, and eager it is also the faster one over forward + backward (docs/gpu.md).
  With states (a prefill into a cache), fla's triton `causal_conv1d` (channels last, varlen);
  fla keeps the conv state as the last K inputs `[N, C, K]`, ours is the last K-1 `[N, C, K-1]`,
  so the state is padded on the way in and trimmed on the way out (fla never reads its oldest
  column). A decoding step (`causal_conv1d_step_`) is one small Triton kernel of ours: the
  window's sum, the SiLU and the window's shift in place.
- gated RMSNorm: fla's fused `rms_norm_gated` (`w * norm(x) * silu(z)`, one pass, eps passed).
- causal softmax attention: `torch.nn.attention.varlen.varlen_attn` (flash attention on packed
  `[T, H, D]`), causal through `window_size=(-1, 0)`; kv heads are repeated where this torch has
  no `enable_gqa`. A row that is one document (or a plain batch `[B, T]`) on a Hopper GPU takes
  cuDNN's fused attention through `scaled_dot_product_attention` instead: at head_dim 256 it runs
  a long causal document's forward 2x and forward + backward 1.6x as fast as the flash kernel
  (H200, docs/gpu.md), which is what the longest-context rows spend their time on.
- linear cross-entropy: chunks of tokens through one bf16 matmul each, Liger's triton kernel
  turns the logits into loss and logit-gradient in place, and the gradients of hidden and weight
  are accumulated right there (the weight's in float32), so nothing is recomputed in backward.
- routed experts: token permutation and grouped GEMM (`qwen35.ops.moe.grouped_experts`).

Host syncs: the kernels want the document lengths on the host (fla's chunk indices, the flash
kernel's max length). They are read once per `cu_seqlens` tensor: `_host_view` keeps the last
one by identity, so the 24 layers of a step share one copy. A `cu_seqlens` tensor must therefore
never be modified in place (fla caches by identity too).

A plain batch `[B, T]` runs through fla as a packed row of B documents of length T (cu_seqlens
cached per shape): fla autotunes every kernel variant on first use, keyed on head counts and
varlen-or-not, which costs minutes on a fresh machine; one variant is enough.

Inputs on the CPU, or in a dtype flash attention lacks, go to the reference op.

torch.compile: the ops that read the document lengths on the host are `torch.compiler.disable`d,
so a compiled decoder layer calls them as opaque functions: traced, the host view's cache and
fla's `prepare_chunk_indices` would become part of the graphs and their guards (autocast state
among them). The gated RMSNorm is elementwise: traced (`torch.compiler.is_compiling()`), it runs
as its torch reference inside the layer's graph, where inductor fuses it with its neighbours,
instead of as fla's kernel behind a graph break; called eagerly, it is fla's kernel. With the
conv our op, a GDN layer compiles as two graphs around the delta rule instead of five around
fla's conv, delta rule and norm; each fla call dropped was a Python launch path that the host ran
in forward and backward (the compiled 8k step is host-bound, docs/benchmarks.md). The delta
rule's q/k L2 norm stays inside fla's kernel: traced in the graph instead, it cost 1.7 GiB more
peak memory at 0.8B and 8k tokens and no less GPU time (docs/benchmarks.md).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
import triton
from fla.modules.causal_conv1d import causal_conv1d as _fla_causal_conv1d
from fla.modules.norm.fused_norm_gate import rms_norm_gated as _fla_rms_norm_gated
from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk_gated_delta_rule
from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as _fla_recurrent_gated_delta_rule
from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_fwd_kernel as _fla_recurrent_kernel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.varlen import varlen_attn

from qwen35.ops import attention as _attention
from qwen35.ops import conv as _conv
from qwen35.ops import cross_entropy as _cross_entropy
from qwen35.ops import delta_rule as _delta_rule
from qwen35.ops import fast_conv
from qwen35.ops import moe as _moe
from qwen35.ops import norm as _norm
from qwen35.ops.autocast import compute_dtype
from qwen35.ops.cross_entropy import IGNORE_INDEX

try:
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
except ImportError:  # the loss then stays the chunked torch reference
    liger_cross_entropy_kernel = None

_VARLEN_PARAMS = inspect.signature(varlen_attn).parameters
_VARLEN_HAS_GQA = "enable_gqa" in _VARLEN_PARAMS


class _HostView:
    """The last `cu_seqlens` seen (by identity), with its host copy and longest document."""

    tensor: torch.Tensor | None = None
    cpu: torch.Tensor | None = None
    max_len: int = 0


def _host_view(cu_seqlens: torch.Tensor) -> _HostView:
    if _HostView.tensor is not cu_seqlens:
        cpu = cu_seqlens.cpu()  # the one sync per step
        _HostView.tensor, _HostView.cpu = cu_seqlens, cpu
        _HostView.max_len = int((cpu[1:] - cpu[:-1]).max()) if len(cpu) > 1 else 0
    return _HostView


_UNIFORM: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _uniform_cu_seqlens(batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(device, host) cu_seqlens of `batch` sequences of `length`: a plain batch run as a packed
    row, so fla compiles and autotunes only its varlen kernels. Kept per shape, so the tensors
    keep their identity (fla's caches) and cost no sync."""
    key = (batch, length, str(device))
    if key not in _UNIFORM:
        if len(_UNIFORM) > 64:
            _UNIFORM.clear()
        cpu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)
        _UNIFORM[key] = (cpu.to(device), cpu)
    return _UNIFORM[key]


def _as_packed(cu_seqlens, *tensors):
    """Packed row (B == 1 with cu_seqlens) as is; a plain batch `[B, T, ...]` -> `[1, B*T, ...]`."""
    if cu_seqlens is not None:
        return tensors, cu_seqlens, _host_view(cu_seqlens).cpu
    batch, length = tensors[0].shape[:2]
    cu, cu_cpu = _uniform_cu_seqlens(batch, length, tensors[0].device)
    return tuple(t.reshape(1, batch * length, *t.shape[2:]) for t in tensors), cu, cu_cpu


def _on_gpu(*tensors) -> bool:
    return all(t.is_cuda for t in tensors if t is not None)


# --- gated delta rule -----------------------------------------------------------------------


def gated_delta_rule(q, k, v, g, beta, cu_seqlens=None, initial_state=None, output_final_state=False):
    """fla's chunked kernel, q and k L2-normalised inside it; see
    `qwen35.ops.delta_rule.gated_delta_rule` for the contract."""
    if not _on_gpu(q, k, v):
        return _delta_rule.gated_delta_rule(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state)
    return _delta_rule_through_fla(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state)


@torch.compiler.disable
def _delta_rule_through_fla(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state):
    batch, length = v.shape[:2]
    if cu_seqlens is None and length == 1:
        return _recurrent_step(q, k, v, g, beta, initial_state, output_final_state)
    (q, k, v, g, beta), cu, cu_cpu = _as_packed(cu_seqlens, q, k, v, g, beta)
    o, state = _fla_chunk_gated_delta_rule(
        q, k, v, g.float(), beta,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=True,
        cu_seqlens=cu,
        cu_seqlens_cpu=cu_cpu,
    )
    return o.view(batch, length, *o.shape[2:]), (state if output_final_state else None)


def _recurrent_step(q, k, v, g, beta, initial_state, output_final_state):
    """One token per sequence through fla's fused recurrent kernel (graph-capturable)."""
    o, state = _fla_recurrent_gated_delta_rule(  # by keyword: later fla releases add arguments before beta
        q=q, k=k, v=v, g=g.float(), beta=beta,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=True,
    )
    return o, (state if output_final_state else None)


# the kernel arguments `gated_delta_rule_step_` passes (fla 0.6.0's kernel)
_STEP_KERNEL_ARGS = {
    "q", "k", "v", "g", "gk", "gv", "beta", "A_log", "dt_bias", "o", "h0", "ht", "cu_seqlens", "scale", "T",
    "H", "HV", "K", "V", "BK", "BV", "USE_QK_L2NORM_IN_KERNEL", "IS_BETA_HEADWISE", "STATE_V_FIRST",
    "APPLY_BETA_SIGMOID", "ALLOW_NEG_EIGVAL",
}
_STEP_IN_PLACE = _STEP_KERNEL_ARGS <= set(getattr(_fla_recurrent_kernel, "arg_names", ()))


@torch.compiler.disable
def gated_delta_rule_step_(q, k, v, g, beta, state):
    """fla's recurrent kernel over one token, `state` updated in place (see the module docstring)."""
    if not _on_gpu(q, k, v, state):
        return _delta_rule.gated_delta_rule_step_(q, k, v, g, beta, state)
    if not (_STEP_IN_PLACE and state.dtype == torch.float32 and state.is_contiguous()):
        o, new_state = _recurrent_step(q, k, v, g, beta, state, True)
        state.copy_(new_state)
        return o
    batch, length, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2:]
    assert length == 1, "a decoding step is one token per sequence"
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    o = torch.empty_like(v)
    # Tiles of 32 value columns, 2 warps: 141 us a call at 256 sequences x 16 heads x 128 x 128 on an
    # H200 (3.8 TB/s of state moved), against 190 us with fla's own 8 columns, 1 warp
    # (benchmarks/profile_decode.py --gdn-tiles).
    block_v = min(32, triton.next_power_of_2(value_dim))
    grid = (triton.cdiv(value_dim, block_v) * batch * value_heads,)
    _fla_recurrent_kernel[grid](
        q=q, k=k, v=v, g=g.float().contiguous(), gk=None, gv=None, beta=beta, A_log=None, dt_bias=None, o=o,
        h0=state, ht=state, cu_seqlens=None, scale=key_dim**-0.5, T=1, H=key_heads, HV=value_heads, K=key_dim,
        V=value_dim, BK=triton.next_power_of_2(key_dim), BV=block_v, USE_QK_L2NORM_IN_KERNEL=True,
        IS_BETA_HEADWISE=True, STATE_V_FIRST=False, APPLY_BETA_SIGMOID=False, ALLOW_NEG_EIGVAL=False,
        num_warps=2, num_stages=3,
    )
    return o


# --- causal conv1d --------------------------------------------------------------------------


def causal_conv1d(x, weight, cu_seqlens=None, initial_state=None, output_final_state=False):
    """The conv with SiLU: without conv states (training), our Triton op (`qwen35.ops.fast_conv`,
    inside the layer's graph when compiled); with states (a prefill into a cache), fla's. See
    `qwen35.ops.conv.causal_conv1d` for the contract."""
    if _on_gpu(x) and initial_state is None and not output_final_state:
        return fast_conv.causal_conv1d(x, weight, cu_seqlens), None
    return _conv_through_fla(x, weight, cu_seqlens, initial_state, output_final_state)


@torch.compiler.disable
def _conv_through_fla(x, weight, cu_seqlens, initial_state, output_final_state):
    if not _on_gpu(x) or (cu_seqlens is None and x.shape[1] == 1):
        return _conv.causal_conv1d(x, weight, cu_seqlens, initial_state, output_final_state)
    fla_state = None if initial_state is None else F.pad(initial_state.to(x.dtype), (1, 0)).contiguous()
    shape = x.shape
    (x,), cu, cu_cpu = _as_packed(cu_seqlens, x)
    y, final = _fla_causal_conv1d(
        x, weight.contiguous(),
        initial_state=fla_state,
        output_final_state=output_final_state,
        activation="silu",
        cu_seqlens=cu,
        cu_seqlens_cpu=cu_cpu,
    )
    if final is not None:
        final = final[..., 1:].contiguous()  # [N, C, K] -> the last K-1 inputs
    return y.view(shape), final


def causal_conv1d_step_(x, weight, state):
    """One decoding step of the conv in one kernel; see `qwen35.ops.conv.causal_conv1d_step_`."""
    if not _on_gpu(x, state) or not state.is_contiguous():
        return _conv.causal_conv1d_step_(x, weight, state)
    batch, length, channels = x.shape
    assert length == 1, "a decoding step is one token per sequence"
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    block = 256
    fast_conv.conv_step_kernel[(batch, triton.cdiv(channels, block))](
        x, weight, state, out, channels, TAPS=weight.shape[1], BLOCK=block)
    return out


# --- gated RMSNorm --------------------------------------------------------------------------


def gated_rms_norm(x, z, weight, eps):
    """fla's fused `w * norm(x) * silu(z)`; see `qwen35.ops.norm.gated_rms_norm`. Traced by
    torch.compile, the reference (see the module docstring)."""
    if not _on_gpu(x, z) or torch.compiler.is_compiling():
        return _norm.gated_rms_norm(x, z, weight, eps)
    return _fla_rms_norm_gated(x, z, weight, None, activation="silu", eps=eps)


# --- causal attention -----------------------------------------------------------------------


@torch.compiler.disable
def causal_attention(q, k, v, cu_seqlens=None, scale=None, causal=True):
    """Flash attention on the packed row; see `qwen35.ops.attention.causal_attention`."""
    dtype = compute_dtype(v)
    if not _on_gpu(q, k, v) or dtype not in (torch.bfloat16, torch.float16):
        return _attention.causal_attention(q, k, v, cu_seqlens, scale, causal)
    batch, length, heads, dim = q.shape
    whole_rows = cu_seqlens is None or len(_host_view(cu_seqlens).cpu) == 2
    if whole_rows and torch.cuda.get_device_capability(q.device)[0] == 9:
        return _cudnn_attention(q, k, v, scale, causal, dtype)
    if cu_seqlens is None:
        cu = torch.arange(0, (batch + 1) * length, length, device=q.device, dtype=torch.int32)
        max_len = length
    else:
        cu, max_len = cu_seqlens.to(torch.int32), _host_view(cu_seqlens).max_len
    out = _varlen(q, k, v, cu, cu, max_len, max_len, scale, causal, dtype)
    return out.view(batch, length, heads, dim)


_CUDNN_SPLIT_ELEMENTS = 2**31


def _cudnn_attention(q, k, v, scale, causal, dtype):
    """Rows that are each one document, `[B, T, H, D]`, through cuDNN's fused attention. Each kv
    head with its query heads runs on its own once q holds 2^31 elements (a 1M-token row of 8
    heads of 256): every tensor a kernel sees then stays within 32-bit element offsets."""
    groups = k.shape[2]
    if q.numel() >= _CUDNN_SPLIT_ELEMENTS and groups > 1:
        per_group = q.shape[2] // groups
        return torch.cat([_cudnn_attention(q[:, :, g * per_group:(g + 1) * per_group], k[:, :, g:g + 1],
                                           v[:, :, g:g + 1], scale, causal, dtype) for g in range(groups)], dim=2)
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


@torch.compiler.disable
def attention_to_keys(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale=None):
    """Flash attention of each document's last queries to its keys, bottom-right causal (flash
    attention's alignment when a document has fewer queries than keys); see
    `qwen35.ops.attention.attention_to_keys`."""
    dtype = compute_dtype(v)
    if not _on_gpu(q, k, v) or dtype not in (torch.bfloat16, torch.float16):
        return _attention.attention_to_keys(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale)
    out = _varlen(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), max_q, max_k, scale, True, dtype)
    return out.view(q.shape)


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, dtype):
    heads, kv_heads, dim = q.shape[2], k.shape[2], q.shape[3]
    q, k, v = (x.reshape(-1, x.shape[2], dim).to(dtype) for x in (q, k, v))
    extra = {}
    if heads != kv_heads:
        if _VARLEN_HAS_GQA:
            extra["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    if "window_size" in _VARLEN_PARAMS:
        extra["window_size"] = (-1, 0) if causal else (-1, -1)
    else:  # the first releases of varlen_attn spelt causal as a flag
        extra["is_causal"] = causal
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **extra)


# --- fused linear cross-entropy -------------------------------------------------------------

CE_CHUNK_TOKENS = 2048  # bf16 logits of one chunk: 2048 x 248,320 x 2 bytes = 1 GB


def _loss_and_grads(hidden_ND, weight_VD, targets_N, chunk_tokens, want_h: bool, want_w: bool):
    """Per-token losses, and the gradients of hidden and weight asked for (else None), chunk by
    chunk: one chunk of logits is alive at a time, and it becomes its own gradient in place."""
    dtype = compute_dtype(weight_VD)
    with torch.autocast("cuda", enabled=False):
        h, w = hidden_ND.to(dtype), weight_VD.to(dtype)
        tokens, vocab = h.shape[0], w.shape[0]
        targets = targets_N.contiguous()
        loss_N = torch.zeros(tokens, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        logits_buffer = torch.empty(min(chunk_tokens, tokens), vocab, dtype=dtype, device=h.device)
        for start in range(0, tokens, chunk_tokens):
            end = min(start + chunk_tokens, tokens)
            logits = logits_buffer[: end - start]
            torch.mm(h[start:end], w.t(), out=logits)
            _liger_loss_and_grad(logits, targets[start:end], loss_N[start:end], want_h or want_w)
            # `logits` now holds d loss / d logits (zero rows where the target is ignored)
            if want_h:
                torch.mm(logits, w, out=grad_h[start:end])
            if want_w:
                if dtype == torch.float32:
                    grad_w.addmm_(logits.t(), h[start:end])
                else:
                    torch.addmm(grad_w, logits.t(), h[start:end], out_dtype=torch.float32, out=grad_w)
    return loss_N, grad_h, grad_w


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T`; the gradients are made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, chunk_tokens):
        loss_N, grad_h, grad_w = _loss_and_grads(hidden_ND, weight_VD, targets_N, chunk_tokens,
                                                 ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden_ND.dtype, weight_VD.dtype)
        return loss_N.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = (grad_h.float() * grad_loss).to(hidden_dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(weight_dtype)
        return grad_h, grad_w, None, None


def _liger_loss_and_grad(logits, targets, loss_out, with_grad: bool) -> None:
    vocab = logits.shape[1]
    liger_cross_entropy_kernel[(logits.shape[0],)](
        X_ptr=logits, X_stride=logits.stride(0), Y_ptr=targets, Y_stride=targets.stride(0),
        weight_ptr=None, loss_ptr=loss_out, z_loss_ptr=None, loss_stride=loss_out.stride(0),
        token_accuracy_ptr=None, token_accuracy_stride=0,
        predicted_tokens_ptr=None, predicted_tokens_stride=0,
        n_cols=vocab, n_non_ignore=1.0, sum_non_ignore_weight=1.0, weight_sum=0.0,
        ignore_index=IGNORE_INDEX, lse_square_scale=0.0, label_smoothing=0.0, reduction="sum",
        softcap=None, RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False,
        BLOCK_SIZE=min(32768, 1 << (vocab - 1).bit_length()), HAS_WEIGHT=False, HAS_SOFTCAPPING=False,
        HAS_GRADIENTS=with_grad, num_warps=32,
    )


def linear_cross_entropy(hidden_ND, weight_VD, targets_N, chunk_tokens: int = CE_CHUNK_TOKENS):
    """Fused; see `qwen35.ops.cross_entropy.linear_cross_entropy` for the contract."""
    if liger_cross_entropy_kernel is None or not _on_gpu(hidden_ND, weight_VD):
        return _cross_entropy.linear_cross_entropy(hidden_ND, weight_VD, targets_N)
    if not torch.is_grad_enabled():
        # `needs_input_grad` follows requires_grad, not grad mode: under no_grad (evaluation) the
        # Function would still build the float32 vocab x hidden weight gradient (~4 GB for a 9B).
        return _loss_and_grads(hidden_ND, weight_VD, targets_N, chunk_tokens, False, False)[0].sum()
    return FusedLinearCrossEntropy.apply(hidden_ND, weight_VD, targets_N, chunk_tokens)


OPS = {
    "gated_delta_rule": gated_delta_rule,
    "gated_delta_rule_step_": gated_delta_rule_step_,
    "causal_conv1d": causal_conv1d,
    "causal_conv1d_step_": causal_conv1d_step_,
    "causal_attention": causal_attention,
    "attention_to_keys": attention_to_keys,
    "gated_rms_norm": gated_rms_norm,
    "linear_cross_entropy": linear_cross_entropy,
    "routed_experts": _moe.grouped_experts,
}
