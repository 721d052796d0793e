"""qwen35: PyTorch-native training for the Qwen3.5 model family."""

from qwen35.model import PRESETS, Qwen35Config, Qwen35ForCausalLM, Qwen35ForConditionalGeneration, preset

__all__ = ["PRESETS", "Qwen35Config", "Qwen35ForCausalLM", "Qwen35ForConditionalGeneration", "preset"]
__version__ = "0.1.0"
