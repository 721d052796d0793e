"""The kernel seam: every heavy op the model calls, chosen in this one place.

The model calls `ops.gated_delta_rule` and `ops.causal_conv1d` (and their `_step_` forms to decode), `ops.causal_attention`,
`ops.attention_to_keys`, `ops.gated_rms_norm`, `ops.linear_cross_entropy` and `ops.routed_experts`; each resolves to the torch reference
(readable, runs anywhere, the ground truth of the tests) or, once selected with
`use_backend("fast")`, to the GPU kernels of `qwen35.ops.fast` (flash-linear-attention, torch's
varlen flash attention, a fused linear cross-entropy, grouped-GEMM experts). A fast op has the reference's signature
and is tested against it (tests/gpu).

    from qwen35 import ops
    ops.use_backend("fast")                 # raises, saying what to install, if it cannot run
    ops.use_backend("fast", strict=False)   # warns and stays on the reference instead
    ops.use_backend("fast", delta_rule_kernel="flash_qla")   # one op's kernel: FlashQLA

Per-op kernel choice: the gated delta rule runs fla's Triton kernels ("fla") or QwenLM's
FlashQLA ("flash_qla", `qwen35.ops.fast_qla`). fla 0.6.0 itself hands its delta rule to FlashQLA
whenever `flash_qla` imports, unless `FLA_FLASH_QLA=0`. The choice sets that variable too (0 for
"fla", 1 for "flash_qla"), so every caller of fla's delta rule in this process (transformers'
Qwen3.5 among them) runs the kernel chosen, and "fla" means fla's own Triton kernels.
"""

from __future__ import annotations

import os
import warnings

from qwen35.envcheck import DELTA_RULE_KERNELS
from qwen35.ops import attention as _attention
from qwen35.ops import conv as _conv
from qwen35.ops import cross_entropy as _cross_entropy
from qwen35.ops import delta_rule as _delta_rule
from qwen35.ops import moe as _moe
from qwen35.ops import norm as _norm
from qwen35.ops.attention import cached_attention
from qwen35.ops.slicing import gated_delta_rule_in_slices

BACKENDS = ("reference", "fast")

_REFERENCE = {
    "gated_delta_rule": _delta_rule.gated_delta_rule,
    "gated_delta_rule_step_": _delta_rule.gated_delta_rule_step_,
    "causal_conv1d": _conv.causal_conv1d,
    "causal_conv1d_step_": _conv.causal_conv1d_step_,
    "causal_attention": _attention.causal_attention,
    "attention_to_keys": _attention.attention_to_keys,
    "gated_rms_norm": _norm.gated_rms_norm,
    "linear_cross_entropy": _cross_entropy.linear_cross_entropy,
    "routed_experts": _moe.expert_loop,
}
_active = dict(_REFERENCE)
_backend = "reference"
_delta_rule_kernel = "reference"


def use_backend(name: str, strict: bool = True, delta_rule_kernel: str = "fla") -> str:
    """Routes the seam's ops to `name` ("reference" or "fast"); returns the backend now in use.

    "fast" first checks the environment (`qwen35.envcheck`): no CUDA, no flash-linear-attention,
    or a triton that miscompiles fla's backward on Hopper. With `strict` that raises
    `FastPathUnavailable` with what to install; without it, it warns and keeps the reference.
    Never a silent fallback that could compute wrong gradients. `delta_rule_kernel` ("fla" or
    "flash_qla") picks the fast delta rule; an unusable FlashQLA raises (strict) or warns and
    keeps fla's kernel.
    """
    global _backend, _delta_rule_kernel
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if delta_rule_kernel not in DELTA_RULE_KERNELS:
        raise ValueError(f"unknown delta-rule kernel {delta_rule_kernel!r}; choose one of "
                         f"{', '.join(DELTA_RULE_KERNELS)}")
    if name == "reference":
        _active.update(_REFERENCE)
        _backend = _delta_rule_kernel = "reference"
        return _backend
    from qwen35.envcheck import FastPathUnavailable, check_delta_rule_kernel, check_fast_path

    problem = check_fast_path(strict=strict)
    if problem is None:
        try:
            from qwen35.ops import fast
        except ImportError as e:  # a package the check does not know of, or one broken otherwise
            if strict:
                raise FastPathUnavailable(f"the fast GPU ops failed to import: {e}") from e
            problem = f"the fast GPU ops failed to import: {type(e).__name__}: {e}"
    if problem is not None:
        warnings.warn(f"fast ops unavailable, using the torch reference: {problem}", stacklevel=2)
        return use_backend("reference")
    _active.update(fast.OPS)
    _backend, _delta_rule_kernel = "fast", "fla"
    if delta_rule_kernel == "flash_qla":
        problem = check_delta_rule_kernel("flash_qla", strict=strict)
        if problem is None:
            from qwen35.ops import fast_qla

            _active["gated_delta_rule"] = fast_qla.gated_delta_rule
            _delta_rule_kernel = "flash_qla"
        else:
            warnings.warn(f"FlashQLA unavailable, using fla's delta rule: {problem}", stacklevel=2)
    os.environ["FLA_FLASH_QLA"] = "1" if _delta_rule_kernel == "flash_qla" else "0"  # see the module docstring
    return _backend


def current_backend() -> str:
    return _backend


def current_delta_rule_kernel() -> str:
    """"reference", "fla" or "flash_qla": what `gated_delta_rule` runs now."""
    return _delta_rule_kernel


def gated_delta_rule(q, k, v, g, beta, cu_seqlens=None, initial_state=None, output_final_state=False):
    return _active["gated_delta_rule"](q, k, v, g, beta, cu_seqlens, initial_state, output_final_state)


def gated_delta_rule_step_(q, k, v, g, beta, state):
    """A decoding step: one token per sequence, `state` (float32) updated in place; returns o."""
    return _active["gated_delta_rule_step_"](q, k, v, g, beta, state)


def causal_conv1d(x, weight, cu_seqlens=None, initial_state=None, output_final_state=False):
    return _active["causal_conv1d"](x, weight, cu_seqlens, initial_state, output_final_state)


def causal_conv1d_step_(x, weight, state):
    """A decoding step of the conv: one token per sequence, the window `state` updated in place."""
    return _active["causal_conv1d_step_"](x, weight, state)


def causal_attention(q, k, v, cu_seqlens=None, scale=None, causal=True):
    """Softmax attention within each document of a packed row; `causal=False` lets every token
    see its whole document (vision patches)."""
    return _active["causal_attention"](q, k, v, cu_seqlens, scale, causal)


def attention_to_keys(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale=None):
    """Each document's queries, its last tokens, against all its keys so far (context
    parallelism; see `qwen35.ops.attention.attention_to_keys`)."""
    return _active["attention_to_keys"](q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale)


def gated_rms_norm(x, z, weight, eps):
    return _active["gated_rms_norm"](x, z, weight, eps)


def linear_cross_entropy(hidden_ND, weight_VD, targets_N):
    """Summed token loss of `hidden @ weight.T` (targets -100 count nothing); no full logits."""
    return _active["linear_cross_entropy"](hidden_ND, weight_VD, targets_N)


def routed_experts(x_ND, weights_NK, experts_NK, gate_up_EIH, down_EHI):
    """Sum over each token's top-k experts of weight * SwiGLU expert(x); see `qwen35.ops.moe`."""
    return _active["routed_experts"](x_ND, weights_NK, experts_NK, gate_up_EIH, down_EHI)


__all__ = [
    "BACKENDS", "DELTA_RULE_KERNELS", "use_backend", "current_backend", "current_delta_rule_kernel",
    "gated_delta_rule", "gated_delta_rule_step_", "causal_conv1d",
    "causal_attention", "attention_to_keys", "gated_rms_norm", "linear_cross_entropy", "routed_experts", "cached_attention",
    "gated_delta_rule_in_slices",
]
