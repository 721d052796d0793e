"""Per-layer state for incremental decoding.

Gated DeltaNet layers keep a conv window (the last K-1 inputs) and the recurrent state; attention
layers keep keys and values. A batch of prompts of different lengths is prefilled as one packed
row (`cu_seqlens`): document i becomes sequence i of the cache, so no padding ever enters a
state. Decoding then feeds one token per sequence; `lengths` says how many tokens each sequence
holds, which is also the position of its next token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen35.model.config import Qwen35Config
from qwen35.ops.segments import positions_in_documents


@dataclass
class DeltaNetCache:
    conv_state: torch.Tensor | None = None  # [B, C, K-1]
    recurrent_state: torch.Tensor | None = None  # [B, Hv, Dk, Dv], float32

    @property
    def started(self) -> bool:
        return self.recurrent_state is not None

    def update(self, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
        self.conv_state, self.recurrent_state = conv_state, recurrent_state


@dataclass
class AttentionCache:
    keys: torch.Tensor  # [B, L, Hkv, D]
    values: torch.Tensor


class InferenceCache:
    def __init__(self, config: Qwen35Config, batch_size: int, max_length: int, device, dtype):
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # M-RoPE (the vision-language model): how far each sequence's next position runs ahead
        # of its length, because an image's tokens take fewer positions than they are tokens.
        # Set by the prompt's forward, read by every decoding step; 0 for text.
        self.position_offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
        self.layers = [
            AttentionCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            if kind == "full_attention" else DeltaNetCache()
            for kind in config.layer_types
        ]

    def slots(self, length: int, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence index, position) of each new token, flattened in the input's order."""
        if cu_seqlens is not None:
            assert not bool(self.lengths.any()), "a packed prefill starts from an empty cache"
            counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            sequence = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
            return sequence, positions_in_documents(cu_seqlens, length)
        batch = self.lengths.shape[0]
        position = self.lengths[:, None] + torch.arange(length, device=self.lengths.device)
        sequence = torch.arange(batch, device=position.device)[:, None].expand_as(position)
        return sequence.reshape(-1), position.reshape(-1)

    def advance(self, length: int, cu_seqlens: torch.Tensor | None) -> None:
        """Called once after each forward: the new tokens now count as seen."""
        if cu_seqlens is not None:
            self.lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(self.lengths.device)
        else:
            self.lengths = self.lengths + length
