"""Routed experts: each token through its top-k SwiGLU experts, weighted and summed.

Both take the experts as transformers holds them, `gate_up [E, 2I, H]` (gate rows first) and
`down [E, H, I]`, and the router's choice `experts [N, K]` with its weights `[N, K]`.

- `expert_loop`: the reference; one expert at a time over the tokens routed to it.
- `grouped_experts`: token permutation and grouped GEMM. The N*K token copies are sorted by
  expert (a stable sort, so each expert sees its tokens in order), the experts' products run as
  one `grouped_mm` each for gate/up and down (`offs` = where each expert's rows end), and the
  weighted rows are added back to their tokens. No host sync, no per-expert launch. Under
  autocast the inputs and weights are cast to the autocast dtype as `F.linear` would be
  (grouped_mm is not on autocast's list). On Hopper this is cuBLAS/CUTLASS grouped GEMM in
  bf16; on the CPU the same op runs in float32, which is how CI checks it against the loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.ops.autocast import compute_dtype

_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def expert_loop(x_ND, weights_NK, experts_NK, gate_up_EIH, down_EHI):
    out = torch.zeros_like(x_ND)
    for expert in range(gate_up_EIH.shape[0]):
        token, slot = torch.where(experts_NK == expert)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x_ND[token], gate_up_EIH[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_EHI[expert]) * weights_NK[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def grouped_experts(x_ND, weights_NK, experts_NK, gate_up_EIH, down_EHI):
    num_experts, top_k = gate_up_EIH.shape[0], experts_NK.shape[1]
    dtype = compute_dtype(x_ND)
    choice = experts_NK.flatten()
    order = choice.argsort(stable=True)  # token copies grouped by expert
    token = order // top_k
    ends = torch.bincount(choice, minlength=num_experts).cumsum(0).to(torch.int32)
    x_MD = x_ND[token].to(dtype)
    gate, up = _grouped_mm(x_MD, gate_up_EIH.to(dtype).transpose(-2, -1), offs=ends).chunk(2, dim=-1)
    y_MD = _grouped_mm(F.silu(gate) * up, down_EHI.to(dtype).transpose(-2, -1), offs=ends)
    y_MD = y_MD * weights_NK.flatten()[order, None].to(y_MD.dtype)
    return torch.zeros_like(x_ND).index_add_(0, token, y_MD.to(x_ND.dtype))
