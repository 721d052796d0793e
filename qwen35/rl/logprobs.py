"""Per-token log-probabilities (and entropies) of completions under the policy, in one packed row.

Prompt + completion of each sample form one document of a packed row (`cu_seqlens`), exactly as
SFT packs: no padding, and the GDN states and attention never cross from one sample into the
next. Only the completion tokens' positions are projected onto the vocabulary, chunk by chunk
with the backward recomputing each chunk's logits, so a 248k vocabulary's full logits never
exist at once (as in `ops.cross_entropy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from qwen35.model.model import next_token_targets
from qwen35.ops.cross_entropy import IGNORE_INDEX


@dataclass
class PackedSamples:
    input_ids: torch.Tensor  # [1, T]: prompt + completion of every sample, back to back
    cu_seqlens: torch.Tensor  # [S + 1] int32
    targets: torch.Tensor  # [T]: the completion token predicted at each position, else -100
    completion_lengths: list[int]


def pack_samples(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], device=None) -> PackedSamples:
    """One packed row of (prompt, completion) samples; the loss tokens are the completions'."""
    ids, labels, lengths = [], [], [0]
    for prompt, completion in zip(prompts, completions, strict=True):
        ids += list(prompt) + list(completion)
        labels += [IGNORE_INDEX] * len(prompt) + list(completion)
        lengths.append(len(prompt) + len(completion))
    cu_seqlens = torch.tensor(lengths).cumsum(0).to(device=device, dtype=torch.int32)
    labels_1T = torch.tensor([labels], device=device)
    targets = next_token_targets(labels_1T, cu_seqlens)[0]
    return PackedSamples(torch.tensor([ids], device=device), cu_seqlens, targets, [len(c) for c in completions])


def _chunk_logprobs(hidden_ND, lm_head, targets_N, temperature: float, with_entropy: bool):
    logp_NV = torch.log_softmax(lm_head(hidden_ND).float() / temperature, dim=-1)
    chosen = logp_NV.gather(-1, targets_N[:, None])[:, 0]
    if not with_entropy:
        return chosen, None
    return chosen, -(logp_NV.exp() * logp_NV).sum(-1)


def completion_logprobs(model, samples: PackedSamples, temperature: float = 1.0, with_entropy: bool = False,
                        chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`log softmax(logits / temperature)` at each completion token, in sample order `[N]`, and
    the entropy of that distribution when asked. The temperature is the sampling temperature, so
    these are the log-probs the rollout engine records for the same tokens (greedy decoding,
    temperature 0, records them at temperature 1).

    Computed by the model's own forward (its `head` seam), so FSDP's gathering of the weights,
    adapters and activation checkpointing all apply as in SFT training."""
    temperature = temperature if temperature > 0 else 1.0
    keep = samples.targets != IGNORE_INDEX
    targets_N = samples.targets[keep]

    def head(hidden_BTD, lm_head):
        hidden_ND = hidden_BTD[0][keep]
        logps, entropies = [], []
        for start in range(0, hidden_ND.shape[0], chunk_size):
            end = start + chunk_size
            logp, entropy = checkpoint(_chunk_logprobs, hidden_ND[start:end], lm_head, targets_N[start:end],
                                       temperature, with_entropy, use_reentrant=False)
            logps.append(logp)
            entropies.append(entropy)
        if not logps:
            return hidden_ND.new_zeros(0, dtype=torch.float32), None
        return torch.cat(logps), torch.cat(entropies) if with_entropy else None

    return model(samples.input_ids, cu_seqlens=samples.cu_seqlens, head=head)
