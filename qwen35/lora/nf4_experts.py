"""QLoRA's routed experts: the 3-D expert weights held in 4-bit NF4, dequantized on use.

The routed experts are most of an MoE model (32.2B of the 35B-A3B's 34.7B parameters), so a
QLoRA base that quantizes only the linear layers stays mostly bf16. Here each expert's matrix
(`gate_up_proj[e]` `[2I, H]`, `down_proj[e]` `[H, I]`) is quantized on its own by bitsandbytes
exactly as `Linear4bit` quantizes a weight: NF4 in blocks of 64, the block scales quantized again
to 8 bits in blocks of 256 around their mean ("double quantization"). An expert's storage is its
own (packed codes, 8-bit scales, their 256-block scales and the mean), stacked over experts, so
a checkpoint fills it one expert at a time and no bf16 copy of a layer's experts ever exists.

Compute: the grouped GEMM wants the whole `[E, out, in]` stack, so each forward dequantizes all
experts of a projection at once into a transient tensor of the compute dtype (one bitsandbytes
kernel over the stack; the nested scales are expanded here in torch, since bitsandbytes' nested
form keeps one mean per tensor and ours keeps one per expert). The stack lives while autograd
needs it (the grouped GEMM's input gradient): with activation checkpointing that is one layer's
recomputation; without it, every layer's. docs/lora.md gives the sizes and the per-chunk option.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen35 import ops
from qwen35.model.moe import Experts
from qwen35.ops.autocast import compute_dtype

BLOCK = 64  # values per NF4 scale, as Linear4bit
NESTED_BLOCK = 256  # scales per 8-bit scale block (bitsandbytes' double quantization)


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("lora.quantize_base nf4 needs bitsandbytes: pip install 'qwen35[qlora]'") from e
    return bnb


_CODES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _code(name: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' value tables, made once per device (not per forward): "nf4" (the 16 NF4
    values) and "dynamic" (the 8-bit code its double quantization stores the scales in)."""
    if (name, device) not in _CODES:
        functional = _bnb().functional
        table = functional.get_4bit_type("nf4", device=device) if name == "nf4" else functional.create_dynamic_map()
        _CODES[name, device] = table.to(device)
    return _CODES[name, device]


class NF4ExpertWeight(nn.Module):
    """One 3-D expert weight `[E, out, in]` in NF4, each expert quantized separately.

    Buffers (first dimension: expert): `codes [E, out*in/2]` uint8 (two 4-bit codes a byte),
    `scales [E, blocks]` uint8 (the block absmax, 8-bit), `scale_scales [E, ceil(blocks/256)]`
    and `scale_mean [E]` float32. Not parameters: the base is frozen."""

    def __init__(self, shape: tuple[int, int, int], device=None):
        super().__init__()
        experts, out_features, in_features = shape
        numel = out_features * in_features
        if numel % BLOCK:
            raise ValueError(f"expert weight {tuple(shape)}: {numel} values per expert is not a multiple of {BLOCK}")
        self.shape = torch.Size(shape)
        blocks = numel // BLOCK
        self.register_buffer("codes", torch.empty(experts, numel // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(experts, blocks, dtype=torch.uint8, device=device))
        self.register_buffer("scale_scales", torch.empty(experts, -(-blocks // NESTED_BLOCK), device=device))
        self.register_buffer("scale_mean", torch.empty(experts, device=device))
        self._pending: dict[int, tuple[torch.Tensor, list[slice]]] = {}  # expert -> rows read so far

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @torch.no_grad()
    def quantize_expert(self, expert: int, weight: torch.Tensor) -> None:
        """Stores expert `expert`'s `[out, in]` matrix (any float dtype, any device)."""
        if tuple(weight.shape) != tuple(self.shape[1:]):
            raise ValueError(f"expert {expert}: weight {tuple(weight.shape)}, expected {tuple(self.shape[1:])}")
        codes, state = _bnb().functional.quantize_4bit(
            weight.to(self.device).contiguous(), blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
        self.codes[expert] = codes.view(-1)
        self.scales[expert] = state.absmax
        self.scale_scales[expert] = state.state2.absmax
        self.scale_mean[expert] = state.offset

    def block_absmax(self, experts: slice = slice(None)) -> torch.Tensor:
        """The float32 NF4 block scales `[E', blocks]`: the 8-bit scales decoded per expert."""
        scales = self.scales[experts]
        code = _code("dynamic", self.device)
        per_scale = self.scale_scales[experts].repeat_interleave(NESTED_BLOCK, dim=1)[:, : scales.shape[1]]
        return code[scales.long()] * per_scale + self.scale_mean[experts, None]

    def dequantize(self, dtype: torch.dtype, experts: slice = slice(None)) -> torch.Tensor:
        """Experts `experts` (all by default) as one `[E', out, in]` tensor of `dtype`: one
        bitsandbytes kernel over the stack (a block never spans two experts)."""
        bnb = _bnb()
        codes = self.codes[experts]
        shape = (codes.shape[0], *self.shape[1:])
        state = bnb.functional.QuantState(absmax=self.block_absmax(experts).reshape(-1), shape=torch.Size(shape),
                                          blocksize=BLOCK, quant_type="nf4", dtype=dtype,
                                          code=_code("nf4", self.device))
        return bnb.functional.dequantize_4bit(codes.reshape(-1, 1), state)

    def load_piece(self, index: tuple, stored: torch.Tensor) -> None:
        """A checkpoint's piece of this weight (`qwen35.checkpoint.hf`): a whole 3-D tensor
        (index `()`), an expert (`(e,)`) or a row range of one (`(e, rows)`, the gate and up halves of
        `gate_up_proj`, stored apart). An expert is quantized once all its rows have arrived; until
        then its rows wait here (a checkpoint stores an expert's halves side by side)."""
        if index == ():
            for e in range(self.shape[0]):
                self.quantize_expert(e, stored[e])
            return
        expert = index[0]
        if len(index) == 1:
            self.quantize_expert(expert, stored)
            return
        rows, filled = self._pending.setdefault(expert, (torch.empty(self.shape[1:], dtype=stored.dtype), []))
        rows[index[1]] = stored
        filled.append(index[1])
        if sum(s.stop - s.start for s in filled) == self.shape[1]:
            self.quantize_expert(expert, self._pending.pop(expert)[0])

    @torch.no_grad()
    def normal_(self, std: float, dtype: torch.dtype = torch.bfloat16) -> None:
        """Random weights (presets, benchmarks): each expert drawn on the device and quantized."""
        for e in range(self.shape[0]):
            self.quantize_expert(e, torch.randn(self.shape[1:], device=self.device, dtype=dtype) * std)

    def extra_repr(self) -> str:
        return f"{tuple(self.shape)}, nf4"


class QuantizedExperts(nn.Module):
    """The routed experts over 4-bit weights, with `Experts`' names and call."""

    def __init__(self, shapes: tuple, device=None):
        super().__init__()
        self.gate_up_proj = NF4ExpertWeight(shapes[0], device)
        self.down_proj = NF4ExpertWeight(shapes[1], device)

    @classmethod
    def like(cls, experts: Experts, device=None) -> QuantizedExperts:
        """Empty 4-bit storage of `experts`' shapes (on `device`, or the meta device)."""
        return cls((experts.gate_up_proj.shape, experts.down_proj.shape), device)

    def forward(self, x_ND, weights_NK, experts_NK):
        dtype = compute_dtype(x_ND)
        return ops.routed_experts(x_ND, weights_NK, experts_NK, self.gate_up_proj.dequantize(dtype),
                                  self.down_proj.dequantize(dtype))


def expert_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """A routed-expert weight as a tensor: a parameter as it is, a 4-bit one dequantized."""
    return weight.dequantize(dtype) if isinstance(weight, NF4ExpertWeight) else weight


@torch.no_grad()
def quantize_experts(model: nn.Module) -> nn.Module:
    """Replaces every `Experts` of `model` with `QuantizedExperts`. On a meta model the storage is
    meta too (the checkpoint fills it after `to_empty`, `NF4ExpertWeight.load_piece`); on a
    model with weights, each expert is quantized from them, one at a time."""
    _bnb()
    for name, experts in [(n, m) for n, m in model.named_modules() if type(m) is Experts]:
        parent, _, child = name.rpartition(".")
        device = experts.gate_up_proj.device
        quantized = QuantizedExperts.like(experts, device)
        if not experts.gate_up_proj.is_meta:
            for e in range(experts.gate_up_proj.shape[0]):
                quantized.gate_up_proj.quantize_expert(e, experts.gate_up_proj[e])
                quantized.down_proj.quantize_expert(e, experts.down_proj[e])
        setattr(model.get_submodule(parent), child, quantized)
    return model
