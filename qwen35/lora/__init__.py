"""LoRA and QLoRA: adapters added to a built model (adapters.py), saved, loaded and merged in
PEFT's format (peft_format.py), over a base optionally held in NF4 (nf4.py: linear layers; nf4_experts.py: the routed experts)."""

from qwen35.lora.adapters import (LoraSettings, adapters_disabled, apply_lora, lora_parameter_names,
                                  reset_lora_parameters)
from qwen35.lora.nf4 import quantize_linear_layers
from qwen35.lora.nf4_experts import QuantizedExperts, quantize_experts
from qwen35.lora.peft_format import load_adapter, lora_state_dict, merge_lora, save_adapter

__all__ = ["LoraSettings", "adapters_disabled", "apply_lora", "load_adapter", "lora_parameter_names", "lora_state_dict",
           "merge_lora", "QuantizedExperts", "quantize_experts", "quantize_linear_layers", "reset_lora_parameters",
           "save_adapter"]
