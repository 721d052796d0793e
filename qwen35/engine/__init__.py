"""The rollout engine: continuous batching over preallocated slots, CUDA-graph decode steps."""

from qwen35.engine.decode import DecodeEngine
from qwen35.engine.slots import DecodeView, PrefillView, SlotState

__all__ = ["DecodeEngine", "DecodeView", "PrefillView", "SlotState"]
