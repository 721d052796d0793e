"""LoRA on the linear layers of a built model, with adapters in PEFT's format.

An adapter is added to a targeted `nn.Linear` in place: two small linear layers `lora_A`
(in -> r) and `lora_B` (r -> out) become its children and a forward hook adds
`lora_B(lora_A(dropout(x))) * scale` to its output. The base weight keeps its name
(`...q_proj.weight`), so checkpoints, FSDP and export see the same keys as without adapters, and
the adapter's own keys are PEFT's (`...q_proj.lora_A.weight`), so PEFT, transformers and vLLM load
what we save. `scale` is `alpha / r`, or `alpha / sqrt(r)` with rsLoRA. lora_B starts at zero,
so an adapted model starts equal to its base.

The routed experts are 3-D parameters (`mlp.experts.gate_up_proj [E, 2I, H]`), not linear layers;
`target_parameters` adapts them as PEFT's `ParamWrapper` does: per expert e a rank-r pair, held
stacked as `lora_A [r*E, in]` (rows e*r .. e*r+r-1 are expert e's) and `lora_B [out, r*E]`
(columns r_i*E + e are expert e's), and the experts run with `W + scale * B_e @ A_e`. The pair
lives in the experts module's `weight_adapters`; on disk it takes PEFT's names, where the adapters
of one module nest in the order of `target_parameters`: the last is `mlp.experts.lora_A.weight`,
the one before `mlp.experts.base_layer.lora_A.weight`, and so on. PEFT allows no dropout there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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


def _parameter_targets(model: nn.Module, suffixes: list[str]) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) for each parameter whose full name ends with one of `suffixes`
    (`mlp.experts.gate_up_proj`), modules with adapters weight_adapters, in `suffixes` order."""
    found = []
    for suffix in suffixes:
        hits = [(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2])
                for n, p in model.named_parameters() if p.dim() == 3 and (n == suffix or n.endswith("." + suffix))]
        if not hits:
            raise ValueError(f"lora.target_parameters: {suffix!r} matches no 3-D parameter of the model")
        found += hits
    if any(not hasattr(m, "weight_adapters") for m, _ in found):
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
        return weight + self.delta().to(weight.dtype)


def _add_delta(module: nn.Linear, inputs, output):
    x = module.lora_dropout(inputs[0])
    return output + module.lora_B(module.lora_A(x.to(module.lora_A.weight.dtype))).to(output.dtype) * module.lora_scale


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Adds adapters to the targeted layers and parameters and freezes everything else."""
    if settings.target_parameters and settings.dropout:
        raise ValueError("lora.dropout must be 0 with lora.target_parameters (as in PEFT): the dropout of a "
                         "weight delta has no meaning")
    for p in model.parameters():
        p.requires_grad_(False)
    for module, name in _parameter_targets(model, settings.target_parameters):
        module.weight_adapters[name] = ExpertAdapter(getattr(module, name), settings.rank, settings.scale)
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


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, whole (gathered from every rank under FSDP)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {n: t.detach() for n, t in full.items() if ".lora_A." in n or ".lora_B." in n}


def _peft_names(model: nn.Module) -> dict[str, str]:
    """Our name -> PEFT's for every adapter tensor (they differ only for expert adapters)."""
    names = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Linear) and hasattr(module, "lora_A"):
            names.update({f"{prefix}.{ab}.weight": f"{prefix}.{ab}.weight" for ab in ("lora_A", "lora_B")})
        adapters = getattr(module, "weight_adapters", None) or {}
        for depth, name in enumerate(reversed(list(adapters))):  # the last targeted is outermost
            names.update({f"{prefix}.weight_adapters.{name}.{ab}.weight": f"{prefix}.{'base_layer.' * depth}{ab}.weight"
                          for ab in ("lora_A", "lora_B")})
    return names


def save_adapter(model: nn.Module, directory, base_model: str | None = None) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` with PEFT's key names."""
    settings: LoraSettings = model.lora_settings
    peft_names = _peft_names(model)
    tensors = {PEFT_PREFIX + peft_names[n]: t.to("cpu").contiguous() for n, t in lora_state_dict(model).items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "use_rslora": settings.use_rslora, "target_modules": sorted(settings.target_modules),
        "target_parameters": list(settings.target_parameters),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Adds the adapter saved in `directory` (ours or PEFT's) to `model`."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG}: not an adapter directory")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    settings = LoraSettings(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                            config.get("use_rslora", False), list(config.get("target_modules") or []),
                            list(config.get("target_parameters") or []))
    apply_lora(model, settings)
    ours = {peft: name for name, peft in _peft_names(model).items()}
    tensors = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v
               for k, v in load_file(str(directory / ADAPTER_WEIGHTS)).items()}
    tensors = {ours.get(k, k): v for k, v in tensors.items()}
    expected = lora_state_dict(model)
    if tensors.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        raise ValueError(f"{directory / ADAPTER_WEIGHTS} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in tensors:
                param.copy_(tensors[name])
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight (`W += scale * B @ A`) and removes it."""
    for module in model.modules():
        for name, adapter in list(getattr(module, "weight_adapters", {}).items()):
            getattr(module, name).add_(adapter.delta().to(getattr(module, name).dtype))
            del module.weight_adapters[name]
        if isinstance(module, nn.Linear) and hasattr(module, "lora_A"):
            delta = module.lora_B.weight.float() @ module.lora_A.weight.float() * module.lora_scale
            module.weight.add_(delta.to(module.weight.dtype))
            module.lora_hook.remove()
            del module.lora_A, module.lora_B, module.lora_dropout, module.lora_scale, module.lora_hook
    for p in model.parameters():
        p.requires_grad_(True)
    del model.lora_settings
    return model
