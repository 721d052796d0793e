"""The kernel seam: every token-mixing op the model calls, chosen in this one place.

The model calls `ops.gated_delta_rule`, `ops.causal_conv1d` and `ops.causal_attention`; each
resolves to the torch reference (readable, runs anywhere, the ground truth of the tests) or,
once selected with `use_backend("fast")`, to the GPU kernels. A fast op has the reference's
signature and is tested against it.
"""

from __future__ import annotations

from qwen35.ops import attention as _attention
from qwen35.ops import conv as _conv
from qwen35.ops import delta_rule as _delta_rule
from qwen35.ops.attention import cached_attention

BACKENDS = ("reference",)

_active = {
    "gated_delta_rule": _delta_rule.gated_delta_rule,
    "causal_conv1d": _conv.causal_conv1d,
    "causal_attention": _attention.causal_attention,
}


def gated_delta_rule(q, k, v, g, beta, cu_seqlens=None, initial_state=None, output_final_state=False):
    return _active["gated_delta_rule"](q, k, v, g, beta, cu_seqlens, initial_state, output_final_state)


def causal_conv1d(x, weight, cu_seqlens=None, initial_state=None, output_final_state=False):
    return _active["causal_conv1d"](x, weight, cu_seqlens, initial_state, output_final_state)


def causal_attention(q, k, v, cu_seqlens=None, scale=None):
    return _active["causal_attention"](q, k, v, cu_seqlens, scale)


__all__ = ["gated_delta_rule", "causal_conv1d", "causal_attention", "cached_attention"]
