"""Adapters on disk in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), so
PEFT, transformers and vLLM load what we save and we load what they save; and merging an adapter
into its base weights.

PEFT's names differ from ours only for expert adapters: the adapters of one module nest in the
order of `target_parameters`, so the last is `mlp.experts.lora_A.weight`, the one before
`mlp.experts.base_layer.lora_A.weight`, and so on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from qwen35.lora.nf4_experts import NF4ExpertWeight
from qwen35.lora.adapters import AdaptedExperts, LoraSettings, apply_lora, lora_parameter_names, replace_module
from qwen35.parallel import is_rank_zero

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, whole (gathered from every rank under FSDP)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = lora_parameter_names(model)
    return {n: t.detach() for n, t in full.items() if n in names}


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
    if not is_rank_zero():
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
    if any(isinstance(m, NF4ExpertWeight) for m in model.modules()):
        raise ValueError("cannot merge an adapter into 4-bit routed experts: merge into the float base "
                         "(`qwen35 merge` loads it from the checkpoint)")
    for module_name, module in list(model.named_modules()):
        if isinstance(module, AdaptedExperts):
            for name, adapter in module.weight_adapters.items():
                getattr(module, name).add_(adapter.delta().to(getattr(module, name).dtype))
            replace_module(model, module_name, module.unadapted())
        if isinstance(module, nn.Linear) and hasattr(module, "lora_A"):
            delta = module.lora_B.weight.float() @ module.lora_A.weight.float() * module.lora_scale
            module.weight.add_(delta.to(module.weight.dtype))
            module.lora_hook.remove()
            del module.lora_A, module.lora_B, module.lora_dropout, module.lora_scale, module.lora_hook
    for p in model.parameters():
        p.requires_grad_(True)
    del model.lora_settings
    return model
