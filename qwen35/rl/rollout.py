"""Rollouts: `n_samples_per_prompt` completions of each prompt from the policy being trained.

The engine is `qwen35.engine.DecodeEngine` over the model's own layers: the policy's current
parameters, no copy and no weight sync; `batch_size` slots decoded together, a finished sequence's
slot refilled at once by a waiting one (continuous batching), decode steps as CUDA graphs on a GPU. Each completion comes with the log-probability of each of its tokens
under `softmax(logits / temperature)` (before top-k/top-p filtering), the quantity the training
forward computes for the same tokens (`qwen35.rl.logprobs`); the two differ only by the
arithmetic of incremental versus full-sequence evaluation, which the loss then sees as the
train-vs-rollout mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qwen35.engine import DecodeEngine


@dataclass(frozen=True)
class SamplingConfig:
    n_samples_per_prompt: int = 8
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_response_length: int = 256
    stop_token_ids: tuple[int, ...] = ()  # besides the model's eos
    batch_size: int = 256  # sequences decoded together (the engine's slots)

    def __post_init__(self):
        if self.n_samples_per_prompt < 1:
            raise ValueError(f"rollout.n_samples_per_prompt must be >= 1, got {self.n_samples_per_prompt}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("rollout.temperature must be >= 0, rollout.top_p in (0, 1], rollout.top_k >= 0")
        if self.max_response_length < 1 or self.batch_size < 1:
            raise ValueError("rollout.max_response_length and rollout.batch_size must be >= 1")


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # one per sample: sample i is of prompt i // group_size
    completion_ids: list[list[int]]
    logprobs: list[list[float]]  # per completion token
    truncated: list[bool]  # ended at max_response_length without a stop token
    group_size: int
    stop_token_ids: list[int] = field(default_factory=list)


def stop_tokens(model, cfg: SamplingConfig) -> list[int]:
    eos = model.config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted(set(eos) | set(cfg.stop_token_ids))


@torch.no_grad()
def sample_rollout(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                   generator: torch.Generator | None = None) -> Rollout:
    """Samples `cfg.n_samples_per_prompt` completions per prompt, `cfg.batch_size` sequences at
    a time, with the model in eval mode (restored afterwards). The engine's buffers live for this
    call only, so training gets the memory back."""
    stops = stop_tokens(model, cfg)
    samples = [list(p) for p in prompts for _ in range(cfg.n_samples_per_prompt)]
    was_training = model.training
    model.eval()
    try:
        engine = DecodeEngine(model, num_slots=min(cfg.batch_size, len(samples)),
                              max_length=max(map(len, samples), default=1) + cfg.max_response_length)
        completions, logprobs = engine.generate(
            samples, cfg.max_response_length, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            stop_token_ids=stops, generator=generator)
    finally:
        model.train(was_training)
    truncated = [not (c and c[-1] in stops) for c in completions]
    return Rollout(samples, completions, logprobs, truncated, cfg.n_samples_per_prompt, stops)
