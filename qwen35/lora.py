"""LoRA on the linear layers of a built model, with adapters in PEFT's format.

An adapter is added to a targeted `nn.Linear` in place: two small linear layers `lora_A`
(in -> r) and `lora_B` (r -> out) become its children and a forward hook adds
`lora_B(lora_A(dropout(x))) * scale` to its output. The base weight keeps its name
(`...q_proj.weight`), so checkpoints, FSDP and export see the same keys as without adapters, and
the adapter's own keys are PEFT's (`...q_proj.lora_A.weight`), so PEFT, transformers and vLLM load
what we save. `scale` is `alpha / r`, or `alpha / sqrt(r)` with rsLoRA. lora_B starts at zero,
so an adapted model starts equal to its base.
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

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _targets(model: nn.Module, suffixes: list[str]) -> list[tuple[str, nn.Linear]]:
    """Linear layers whose name ends with one of `suffixes` (`q_proj`, `linear_attn.in_proj_qkv`)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == s or n.endswith("." + s) for s in suffixes)]
    if not found:
        raise ValueError(f"lora.target_modules {suffixes} match no linear layer of the model")
    return found


def _add_delta(module: nn.Linear, inputs, output):
    x = module.lora_dropout(inputs[0])
    return output + module.lora_B(module.lora_A(x.to(module.lora_A.weight.dtype))).to(output.dtype) * module.lora_scale


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Adds adapters to the targeted layers and freezes every other parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
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
def reset_lora_parameters(model: nn.Module) -> None:
    """PEFT's initialisation: A Kaiming-uniform, B zero. Also after meta construction."""
    for module in model.modules():
        if hasattr(module, "lora_A") and not module.lora_A.weight.is_meta:
            nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(module.lora_B.weight)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, whole (gathered from every rank under FSDP)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {n: t.detach() for n, t in full.items() if ".lora_A." in n or ".lora_B." in n}


def save_adapter(model: nn.Module, directory, base_model: str | None = None) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` with PEFT's key names."""
    settings: LoraSettings = model.lora_settings
    tensors = {PEFT_PREFIX + n: t.to("cpu").contiguous() for n, t in lora_state_dict(model).items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "use_rslora": settings.use_rslora, "target_modules": sorted(settings.target_modules),
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
                            config.get("use_rslora", False), list(config["target_modules"]))
    apply_lora(model, settings)
    tensors = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v
               for k, v in load_file(str(directory / ADAPTER_WEIGHTS)).items()}
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
        if hasattr(module, "lora_A"):
            delta = module.lora_B.weight.float() @ module.lora_A.weight.float() * module.lora_scale
            module.weight.add_(delta.to(module.weight.dtype))
            module.lora_hook.remove()
            del module.lora_A, module.lora_B, module.lora_dropout, module.lora_scale, module.lora_hook
    for p in model.parameters():
        p.requires_grad_(True)
    del model.lora_settings
    return model
