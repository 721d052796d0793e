from qwen35.model.config import PRESETS, Qwen35Config, Qwen35VLConfig, VisionConfig, preset
from qwen35.model.model import CausalLMOutput, Qwen35ForCausalLM
from qwen35.model.vl import Qwen35ForConditionalGeneration

__all__ = ["PRESETS", "CausalLMOutput", "Qwen35Config", "Qwen35ForCausalLM", "Qwen35ForConditionalGeneration",
           "Qwen35VLConfig", "VisionConfig", "preset"]
