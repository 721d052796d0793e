"""The peer side of the benchmarks: transformers' model built straight in the benchmark's dtype on
its device (no float32 copy first, which would not fit for the large presets)."""

from __future__ import annotations

import torch


def transformers_model(model_class, hf_config, device, dtype: torch.dtype):
    """`model_class(hf_config)` with sdpa attention, its parameters created in `dtype` on `device`."""
    hf_config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(hf_config)
    finally:
        torch.set_default_dtype(default)
