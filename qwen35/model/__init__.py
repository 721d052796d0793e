from qwen35.model.config import PRESETS, Qwen35Config, preset
from qwen35.model.model import CausalLMOutput, Qwen35ForCausalLM

__all__ = ["PRESETS", "CausalLMOutput", "Qwen35Config", "Qwen35ForCausalLM", "preset"]
