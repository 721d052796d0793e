"""The gated delta rule through FlashQLA (PyPI `flash-qla`, QwenLM's TileLang kernels, SM90+).

Same contract as `qwen35.ops.delta_rule.gated_delta_rule` and the fla op in `qwen35.ops.fast`:
q/k L2-normalised in the kernel, more value than key heads (GVA), packed documents through
`cu_seqlens`, per-document float32 states `[N, Hv, Dk, Dv]`, forward and backward. Chosen with
`model.delta_rule_kernel: flash_qla` (`ops.use_backend("fast", delta_rule_kernel="flash_qla")`).

FlashQLA's kernels exist for head dims of 128 (every Qwen3.5 size) in bf16/fp16; other shapes
and dtypes go to fla's kernel, CPU tensors to the torch reference. Its intra-card context
parallelism (`auto_cp`) splits long documents across the GPU's SMs; it reads the document
lengths on the host, hence `torch.compiler.disable` as for the fla op.

Importing this module imports `flash_qla`, which imports TileLang (and z3): only loaded when
chosen, after `qwen35.envcheck` has found them importable.
"""

from __future__ import annotations

import torch
from flash_qla import chunk_gated_delta_rule as _qla_chunk_gated_delta_rule

from qwen35.ops import delta_rule as _delta_rule
from qwen35.ops import fast

HEAD_DIM = 128  # the only head dim FlashQLA compiles kernels for


def _supported(q, k, v) -> bool:
    return (q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-1] == k.shape[-1] == v.shape[-1] == HEAD_DIM)


@torch.compiler.disable
def gated_delta_rule(q, k, v, g, beta, cu_seqlens=None, initial_state=None, output_final_state=False):
    """FlashQLA's chunked kernel; see `qwen35.ops.delta_rule.gated_delta_rule` for the contract."""
    if not fast._on_gpu(q, k, v):
        return _delta_rule.gated_delta_rule(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state)
    if not _supported(q, k, v):
        return fast.gated_delta_rule(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state)
    batch, length = v.shape[:2]
    (q, k, v, g, beta), cu, _ = fast._as_packed(cu_seqlens, q, k, v, g, beta)
    o, state = _qla_chunk_gated_delta_rule(
        q, k, v, g.float(), beta.to(q.dtype),
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=True,
        cu_seqlens=cu,
    )
    return o.view(batch, length, *o.shape[2:]), (state if output_final_state else None)
