"""QLoRA's base: the frozen linear layers held in 4-bit NF4 (bitsandbytes)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def quantize_linear_layers(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """QLoRA's base: every `nn.Linear` of the decoder layers becomes a frozen bitsandbytes
    `Linear4bit` holding its weight in NF4 (blocks of 64, double-quantized scales), computing in
    `compute_dtype`. Embedding, output head, norms, convolutions, the GDN's float32 parameters and
    the routed experts (3-D) stay as they are. Call before `apply_lora` (adapters hook the
    quantized layers, which are still `nn.Linear`s), on a model already on its device."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("lora.quantize_base nf4 needs bitsandbytes: pip install 'qwen35[qlora]'") from e
    layers = model.model.layers
    for name, linear in list(layers.named_modules()):
        if type(linear) is not nn.Linear:
            continue
        parent, _, child = name.rpartition(".")
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                      device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
        # bitsandbytes repacks the weight in place for its CPU inference kernel on the first
        # no-grad forward (evaluation), which fails for small layers and leaves the layer in that form.
        quantized.support_avx512bf16_for_cpu = False
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(layers.get_submodule(parent), child, quantized.to(linear.weight.device))  # quantizes here
    return model
