"""Activation checkpointing, applied to a built model per decoder layer (before compile and FSDP).

It keeps every parameter name and state-dict key as they were: a layer's `forward` is swapped
for one that runs the original under `torch.utils.checkpoint` (no wrapper module, so no
`_checkpoint_wrapped_module.` prefix).

Checkpointing modes:

- "full": a layer keeps only its input; the backward reruns the whole layer forward (about a
  third more compute; activation memory drops to one fp32 residual per layer).
- "selective": the backward reruns the cheap elementwise work (norms, rotary, SiLU, gates,
  casts) but keeps the outputs of matrix products and of flash attention, which are expensive
  to redo. GDN's fla kernels are rerun (they are opaque triton launches, not dispatcher ops).
- "offload": for the longest contexts. "full", with each layer's kept input copied to pinned CPU
  memory (asynchronously) until its backward brings it back for the recompute; each dense MLP runs over
  slices of `SLICE_TOKENS` tokens, each slice checkpointed on its own, and the delta rule runs
  slice by slice with the state carried over (`qwen35.ops.slicing`). The GPU then holds one
  layer's working set, not one input per layer, and within that layer one slice's SwiGLU
  intermediates and delta-rule backward, not the whole row's (at 512k tokens the 0.8B's gate,
  up and their product alone are about 14 GiB in bf16). The MLP's forward runs once more per
  step; next to attention over such a row that is little.
- "none": nothing.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from qwen35 import ops

AC_MODES = ("none", "full", "selective", "offload")
SLICE_TOKENS = 65536


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


def _from_host(saved):
    if isinstance(saved, tuple):
        device, host = saved
        return host.to(device, non_blocking=True)
    return saved


def _checkpointed(layer: nn.Module, context_fn, offload: bool = False) -> None:
    inner = layer.forward
    options = {} if context_fn is None else {"context_fn": context_fn}  # dynamo wants no default

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **options, **kwargs)

    def offloaded_forward(x, *args, **kwargs):
        # checkpoint saves its inputs through the saved-tensor hooks: `x` goes to pinned CPU
        # memory (asynchronously) and comes back for the recompute. Its gradient stays on the GPU.
        target = [x]

        def to_host(t):
            if not target or t is not target[0] or t.device.type == "cpu":
                return t
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return t.device, host

        with torch.autograd.graph.saved_tensors_hooks(to_host, _from_host):
            out = checkpoint(inner, x, *args, use_reentrant=False, **kwargs)
        target.clear()  # nothing kept for the backward may reference the GPU input
        return out

    layer.forward = offloaded_forward if offload else forward
    layer.activation_checkpointing = True


def _token_chunked(mlp: nn.Module, chunk_tokens: int) -> None:
    """Runs `mlp` (token-wise) over slices of at most `chunk_tokens` tokens, each checkpointed."""
    inner = mlp.forward

    def forward(x):
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= chunk_tokens:
            return inner(x)
        pieces = [checkpoint(inner, piece, use_reentrant=False) for piece in flat.split(chunk_tokens)]
        return torch.cat(pieces).view(*x.shape[:-1], -1)

    mlp.forward = forward


def _delta_rule_in_slices(gdn: nn.Module, slice_tokens: int) -> None:
    """Runs a GDN layer's training-time delta rule (no state in or out) over slices of at most
    `slice_tokens` tokens, the state carried across each border (`qwen35.ops.slicing`)."""
    inner = gdn.delta_rule

    def delta_rule(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state):
        if initial_state is None and not output_final_state and q.shape[1] > slice_tokens:
            return ops.gated_delta_rule_in_slices(ops.gated_delta_rule, q, k, v, g, beta, cu_seqlens, slice_tokens), None
        return inner(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state)

    gdn.delta_rule = delta_rule


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers (of a text model, or a vision-language one)."""
    inner = model.model if hasattr(model, "model") else model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


def vision_blocks(model: nn.Module) -> nn.ModuleList | list:
    """The vision tower's blocks of a vision-language model; none for a text model."""
    inner = model.model if hasattr(model, "model") else model
    visual = getattr(inner, "visual", None)
    return visual.blocks if visual is not None else []


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", slice_tokens: int = SLICE_TOKENS) -> nn.Module:
    """Checkpoints every decoder layer of `model` (a `Qwen35ForCausalLM` or `Qwen35Model`, or
    a vision-language model, whose vision blocks are checkpointed too); `slice_tokens`: the
    "offload" mode's slices of the dense MLPs and of the delta rule. Vision blocks keep their
    inputs on the device in every mode: a micro-batch's patches are few next to its tokens."""
    if mode not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; choose one of {', '.join(AC_MODES)}")
    if mode == "none":
        return model
    if mode in ("full", "offload"):
        context_fn = None
    else:
        context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls_policy(_expensive_ops()))
    for layer in decoder_layers(model):
        if getattr(layer, "activation_checkpointing", False):
            raise ValueError("activation checkpointing is already applied to this model")
        _checkpointed(layer, context_fn, offload=mode == "offload")
        if mode != "offload":
            continue
        if not layer.is_moe:
            _token_chunked(layer.mlp, slice_tokens)
        if layer.layer_type == "linear_attention":
            _delta_rule_in_slices(layer.linear_attn, slice_tokens)
    for block in vision_blocks(model):
        _checkpointed(block, context_fn)
    return model
