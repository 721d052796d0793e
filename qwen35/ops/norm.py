"""Gated RMSNorm of the GDN output, torch reference: `w * norm(x) * silu(z)`.

x and z `[..., D]`, weight `[D]` (an ordinary weight, initialised to 1, stored in float32). The
normalisation runs in float32 and is cast back to x's dtype before the weight and the gate, as
transformers' `Qwen3_5RMSNormGated` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The op behind the seam. Returns x's shape and dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x.to(dtype) * F.silu(z.float())).to(dtype)
