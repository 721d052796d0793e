"""Preallocated decoding state, one slot per sequence being decoded, and the views the model reads.

Every buffer is allocated once, for `num_slots` sequences of up to `max_length` tokens:

- attention layers: keys and values `[S, L, Hkv, D]` in the compute dtype;
- Gated DeltaNet layers: the conv window (the last K-1 inputs) `[S, C, K-1]` and the recurrent
  state `[S, Hv, Dk, Dv]` in float32 — their size does not grow with the sequence.

The model's own forward (`Qwen35Model.forward` with `cache=`) reads and writes them through two
views with the interface of `qwen35.model.cache.InferenceCache`:

- `PrefillView`: a packed row of new prompts, document i going to slot `slot_ids[i]`. Keys and
  values are written straight into those slots; the final conv windows and recurrent states of the
  documents are copied into them.
- `DecodeView`: one token for every slot at `positions[s]`. Attention reads only the first
  `bucket` cache positions (the longest sequence rounded up), and the GDN states are updated in
  place, so the step touches no memory but the slots' own: the condition for a CUDA graph.

A slot whose sequence has ended (or that never held one) still runs through the decode step: it
writes at its own `positions[s]`, which stays inside its buffers, and whatever it computes is
discarded. The next prefill into the slot overwrites its GDN state completely and its keys up to
the prompt's length; later positions are written before any query can see them.
"""

from __future__ import annotations

import torch

from qwen35.model.cache import AttentionCache
from qwen35.model.config import Qwen35Config
from qwen35.ops.segments import positions_in_documents


class SlotDeltaNetState:
    """A GDN layer's conv window and recurrent state for every slot."""

    def __init__(self, config: Qwen35Config, num_slots: int, device, dtype):
        key_dim = config.linear_num_key_heads * config.linear_key_head_dim
        conv_dim = 2 * key_dim + config.linear_num_value_heads * config.linear_value_head_dim
        self.conv_state = torch.zeros(num_slots, conv_dim, config.linear_conv_kernel_dim - 1, device=device, dtype=dtype)
        self.recurrent_state = torch.zeros(num_slots, config.linear_num_value_heads, config.linear_key_head_dim,
                                           config.linear_value_head_dim, device=device, dtype=torch.float32)


class SlotState:
    def __init__(self, config: Qwen35Config, num_slots: int, max_length: int, device, dtype):
        self.num_slots, self.max_length = num_slots, max_length
        shape = (num_slots, max_length, config.num_key_value_heads, config.head_dim)
        self.layers = [
            AttentionCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            if kind == "full_attention" else SlotDeltaNetState(config, num_slots, device, dtype)
            for kind in config.layer_types
        ]

    def memory_bytes(self) -> int:
        tensors = [t for layer in self.layers for t in vars(layer).values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class _PrefillDeltaNet:
    """The GDN cache interface for a prefill: starts empty, and its final states go to the slots."""

    started = False

    def __init__(self, state: SlotDeltaNetState, slot_ids: torch.Tensor):
        self.state, self.slot_ids = state, slot_ids

    def update(self, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
        self.state.conv_state[self.slot_ids] = conv_state.to(self.state.conv_state.dtype)
        self.state.recurrent_state[self.slot_ids] = recurrent_state.float()


class PrefillView:
    """A packed row of prompts (`cu_seqlens`), document i filling slot `slot_ids[i]` from position 0."""

    def __init__(self, state: SlotState, slot_ids: torch.Tensor):
        self.slot_ids = slot_ids
        self.lengths = torch.zeros(len(slot_ids), dtype=torch.long, device=slot_ids.device)
        self.layers = [layer if isinstance(layer, AttentionCache) else _PrefillDeltaNet(layer, slot_ids)
                       for layer in state.layers]

    def slots(self, length: int, cu_seqlens: torch.Tensor | None):
        assert cu_seqlens is not None, "a prefill is one packed row"
        counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        return self.slot_ids.repeat_interleave(counts), positions_in_documents(cu_seqlens, length)

    def advance(self, length: int, cu_seqlens) -> None:
        pass  # the engine keeps the slots' lengths


class _DecodeDeltaNet:
    """The GDN cache interface for a decode step: reads the slots' states, updates them in place."""

    started = True

    def __init__(self, state: SlotDeltaNetState):
        self.conv_state, self.recurrent_state = state.conv_state, state.recurrent_state

    def update(self, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
        pass  # the decoding step updated both in place


class DecodeView:
    """One token for each slot, at `positions [S]`; attention sees the first `bucket` positions."""

    def __init__(self, state: SlotState, positions: torch.Tensor, bucket: int):
        self.lengths = positions  # the model reads `lengths + 1` as the keys each query sees
        self._slots = (torch.arange(state.num_slots, device=positions.device), positions)
        self.layers = [
            AttentionCache(layer.keys[:, :bucket], layer.values[:, :bucket]) if isinstance(layer, AttentionCache)
            else _DecodeDeltaNet(layer)
            for layer in state.layers
        ]

    def slots(self, length: int, cu_seqlens):
        assert length == 1 and cu_seqlens is None, "a decode step is one token per slot"
        return self._slots

    def advance(self, length: int, cu_seqlens) -> None:
        pass
