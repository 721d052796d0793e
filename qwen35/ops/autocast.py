"""The dtype an op computes in, whether or not autocast is on."""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype on `x`'s device when autocast is on there, else `x`'s own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
