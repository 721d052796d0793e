"""Activation checkpointing and torch.compile, applied to a built model, per decoder layer.

Order (torchtitan's): tensor parallel -> `apply_activation_checkpointing` -> `compile_layers`
-> FSDP. Both keep every parameter name and state-dict key as they were: checkpointing swaps a
layer's `forward` for one that runs the original under `torch.utils.checkpoint` (no wrapper
module, so no `_checkpoint_wrapped_module.` prefix), and `nn.Module.compile` compiles the layer
in place.

Checkpointing modes:

- "full": a layer keeps only its input; the backward reruns the whole layer forward (about a
  third more compute; activation memory drops to one fp32 residual per layer).
- "selective": the backward reruns the cheap elementwise work (norms, rotary, SiLU, gates,
  casts) but keeps the outputs of matrix products and of flash attention, which are expensive
  to redo. GDN's fla kernels are rerun (they are opaque triton launches, not dispatcher ops).
- "offload": "full", with each layer's kept input moved to CPU memory until its backward (for
  the longest contexts: the GPU then holds one layer's working set, not one input per layer).
  The input's gradient takes the same way back.
- "none": nothing.

Compiling fuses the elementwise chains between the matmuls. fla's kernels are not traceable
(`chunk_gated_delta_rule` is `torch.compiler.disable`d by fla itself), so a GDN layer compiles
as a few graphs around them; attention layers compile whole.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective", "offload")


def _expensive_ops() -> set:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_flash_attention_forward",
                 "_efficient_attention_forward"):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    try:  # torch's varlen flash attention is a custom op of its own
        ops.add(torch.ops.torch_attn._varlen_attn.default)
    except (AttributeError, RuntimeError):
        pass
    return ops


def _save_matmuls_policy(save: set):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _checkpointed(layer: nn.Module, context_fn, offload: bool = False) -> None:
    inner = layer.forward
    options = {} if context_fn is None else {"context_fn": context_fn}  # dynamo wants no default

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **options, **kwargs)

    def offloaded_forward(x, *args, **kwargs):
        def from_host(kept, *rest, **kw):
            return inner(kept.to(x.device, non_blocking=True), *rest, **kw)

        return checkpoint(from_host, x.to("cpu"), *args, use_reentrant=False, **kwargs)

    layer.forward = offloaded_forward if offload else forward
    layer.activation_checkpointing = True


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.layers


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> nn.Module:
    """Checkpoints every decoder layer of `model` (a `Qwen35ForCausalLM` or `Qwen35Model`)."""
    if mode not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; choose one of {', '.join(AC_MODES)}")
    if mode == "none":
        return model
    if mode in ("full", "offload"):
        context_fn = None
    else:
        context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls_policy(_expensive_ops()))
    for layer in _layers(model):
        if getattr(layer, "activation_checkpointing", False):
            raise ValueError("activation checkpointing is already applied to this model")
        _checkpointed(layer, context_fn, offload=mode == "offload")
    return model


def compile_layers(model: nn.Module, **compile_kwargs) -> nn.Module:
    """`torch.compile`s each decoder layer in place (after checkpointing, before FSDP).

    Layers share their code, so one compiled graph per layer type serves all of them (dynamo
    treats the parameters as inputs). `compile_kwargs` go to `torch.compile` (e.g. backend).
    """
    for layer in _layers(model):
        layer.compile(**compile_kwargs)
    return model
