"""LoRA adapters added to a built model from outside, keeping every base parameter's name.

An adapter is added to a targeted `nn.Linear` in place: two small linear layers `lora_A`
(in -> r) and `lora_B` (r -> out) become its children and a forward hook adds
`lora_B(lora_A(dropout(x))) * scale` to its output. The base weight keeps its name
(`...q_proj.weight`), so checkpoints, FSDP and export see the same keys as without adapters, and
the adapter's own keys are PEFT's (`...q_proj.lora_A.weight`). `scale` is `alpha / r`, or
`alpha / sqrt(r)` with rsLoRA. lora_B starts at zero, so an adapted model starts equal to its base.

The routed experts are 3-D parameters (`mlp.experts.gate_up_proj [E, 2I, H]`), not linear layers;
`target_parameters` adapts them as PEFT's `ParamWrapper` does: per expert e a rank-r pair, held
stacked as `lora_A [r*E, in]` (rows e*r .. e*r+r-1 are expert e's) and `lora_B [out, r*E]`
(columns r_i*E + e are expert e's), and the experts run with `W + scale * B_e @ A_e`. The experts
module is replaced by an `AdaptedExperts` that holds the same two parameters (same names) and
the pairs in `weight_adapters`. PEFT allows no dropout there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from qwen35 import ops
from qwen35.lora.nf4_experts import NF4ExpertWeight, QuantizedExperts, expert_weight
from qwen35.model.moe import Experts
from qwen35.ops.autocast import compute_dtype


@dataclass
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _targets(model: nn.Module, suffixes: list[str]) -> list[tuple[str, nn.Linear]]:
    """Linear layers whose name ends with one of `suffixes` (`q_proj`, `linear_attn.in_proj_qkv`)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == s or n.endswith("." + s) for s in suffixes)]
    if suffixes and not found:
        raise ValueError(f"lora.target_modules {suffixes} match no linear layer of the model")
    return found


def _parameter_targets(model: nn.Module, suffixes: list[str]) -> list[tuple[str, str]]:
    """(module name, parameter name) for each routed-expert weight whose full name ends with one
    of `suffixes` (`mlp.experts.gate_up_proj`), in `suffixes` order: 3-D parameters, or the
    4-bit expert weights of a QLoRA base."""
    weights = [n for n, p in model.named_parameters() if p.dim() == 3]
    weights += [n for n, m in model.named_modules() if isinstance(m, NF4ExpertWeight)]
    found = []
    for suffix in suffixes:
        hits = [n.rpartition(".") for n in weights if n == suffix or n.endswith("." + suffix)]
        if not hits:
            raise ValueError(f"lora.target_parameters: {suffix!r} matches no 3-D parameter of the model")
        found += [(module, name) for module, _, name in hits]
    if any(not isinstance(model.get_submodule(m), (Experts, QuantizedExperts)) for m, _ in found):
        raise ValueError(f"lora.target_parameters {suffixes}: only the routed experts take parameter adapters")
    return found


class ExpertAdapter(nn.Module):
    """LoRA on a 3-D expert weight `[E, out, in]`: the weight used is `W + scale * B_e @ A_e`."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float):
        super().__init__()
        experts, out_features, in_features = weight.shape
        self.num_experts, self.lora_scale = experts, scale
        self.lora_A = nn.Linear(in_features, rank * experts, bias=False, device=weight.device)
        self.lora_B = nn.Linear(rank * experts, out_features, bias=False, device=weight.device)

    def delta(self) -> torch.Tensor:
        a = self.lora_A.weight.view(self.num_experts, -1, self.lora_A.in_features)  # [E, r, in]
        b = self.lora_B.weight.view(self.lora_B.out_features, -1, self.num_experts).permute(2, 0, 1)  # [E, out, r]
        return torch.bmm(b, a) * self.lora_scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "lora_enabled", True):
            return weight
        return weight + self.delta().to(weight.dtype)


class AdaptedExperts(Experts):
    """The routed experts with adapters on their weights: the same two weights (same names:
    parameters, or the 4-bit weights of a QLoRA base, dequantized first), each mapped through its
    adapter in `weight_adapters` before the experts run."""

    def __init__(self, base: Experts | QuantizedExperts):
        nn.Module.__init__(self)  # the weights are the base's, not new ones
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.weight_adapters = nn.ModuleDict()

    def forward(self, x_ND, weights_NK, experts_NK):
        dtype = compute_dtype(x_ND)
        gate_up, down = (self.weight_adapters[n](expert_weight(w, dtype)) if n in self.weight_adapters
                         else expert_weight(w, dtype)
                         for n, w in (("gate_up_proj", self.gate_up_proj), ("down_proj", self.down_proj)))
        return ops.routed_experts(x_ND, weights_NK, experts_NK, gate_up, down)

    def unadapted(self) -> Experts:
        """A plain `Experts` holding the same parameters (after the adapters are merged)."""
        plain = Experts.__new__(Experts)
        nn.Module.__init__(plain)
        plain.gate_up_proj, plain.down_proj = self.gate_up_proj, self.down_proj
        return plain


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _add_delta(module: nn.Linear, inputs, output):
    if not getattr(module, "lora_enabled", True):
        return output
    x = module.lora_dropout(inputs[0])
    return output + module.lora_B(module.lora_A(x.to(module.lora_A.weight.dtype))).to(output.dtype) * module.lora_scale


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Adds adapters to the targeted layers and parameters and freezes everything else.

    On a meta model the adapters are meta too: `reset_lora_parameters` draws them once the model
    has its memory (`to_empty`)."""
    if settings.target_parameters and settings.dropout:
        raise ValueError("lora.dropout must be 0 with lora.target_parameters (as in PEFT): the dropout of a "
                         "weight delta has no meaning")
    for p in model.parameters():
        p.requires_grad_(False)
    for module_name, name in _parameter_targets(model, settings.target_parameters):
        experts = model.get_submodule(module_name)
        if not isinstance(experts, AdaptedExperts):
            experts = AdaptedExperts(experts)
            replace_module(model, module_name, experts)
        experts.weight_adapters[name] = ExpertAdapter(getattr(experts, name), settings.rank, settings.scale)
    for _, linear in _targets(model, settings.target_modules):
        device = linear.weight.device
        linear.lora_A = nn.Linear(linear.in_features, settings.rank, bias=False, device=device)
        linear.lora_B = nn.Linear(settings.rank, linear.out_features, bias=False, device=device)
        linear.lora_dropout = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()
        linear.lora_scale = settings.scale
        linear.lora_hook = linear.register_forward_hook(_add_delta)
    model.lora_settings = settings
    reset_lora_parameters(model)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model, inside the block: every adapter is skipped (GRPO's KL reference with a LoRA
    policy is the base, at no extra memory). Nothing is copied or changed but a flag."""
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    for module in adapted:
        module.lora_enabled = False
    try:
        yield model
    finally:
        for module in adapted:
            module.lora_enabled = True


def lora_parameter_names(model: nn.Module) -> set[str]:
    """The adapter parameters: what a base checkpoint does not hold."""
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@torch.no_grad()
def reset_lora_parameters(model: nn.Module) -> None:
    """PEFT's initialisation: A Kaiming-uniform, B zero. Also after meta construction.

    A is drawn whole on the CPU from torch's global generator and each rank keeps its part, so
    the adapters start the same on any number of ranks (a sharded draw would differ)."""
    for module in model.modules():
        if hasattr(module, "lora_A") and not module.lora_A.weight.is_meta:
            a = module.lora_A.weight
            full = nn.init.kaiming_uniform_(torch.empty(a.shape, dtype=a.dtype), a=math.sqrt(5))
            if isinstance(a, DTensor):
                full = distribute_tensor(full.to(a.device_mesh.device_type), a.device_mesh, a.placements)
            a.copy_(full)
            nn.init.zeros_(module.lora_B.weight)
