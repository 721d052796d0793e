"""Rollouts: `n_samples_per_prompt` completions of each prompt from the policy being trained.

The engine is the model's own decoding (`qwen35.generate`): the policy's current parameters, no
copy and no weight sync. Each completion comes with the log-probability of each of its tokens
under `softmax(logits / temperature)` (before top-k/top-p filtering), the quantity the training
forward computes for the same tokens (`qwen35.rl.logprobs`); the two differ only by the
arithmetic of incremental versus full-sequence evaluation, which the loss then sees as the
train-vs-rollout mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qwen35.generate import generate


@dataclass(frozen=True)
class SamplingConfig:
    n_samples_per_prompt: int = 8
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_response_length: int = 256
    stop_token_ids: tuple[int, ...] = ()  # besides the model's eos
    batch_size: int = 256  # sequences decoded together

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
    a time, with the model in eval mode (restored afterwards)."""
    stops = stop_tokens(model, cfg)
    samples = [list(p) for p in prompts for _ in range(cfg.n_samples_per_prompt)]
    was_training = model.training
    model.eval()
    completions, logprobs = [], []
    try:
        for start in range(0, len(samples), cfg.batch_size):
            tokens, values = generate(
                model, samples[start : start + cfg.batch_size], max_new_tokens=cfg.max_response_length,
                do_sample=cfg.temperature > 0, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                eos_token_id=stops, generator=generator, return_logprobs=True)
            completions += tokens
            logprobs += values
    finally:
        model.train(was_training)
    truncated = [not (c and c[-1] in stops) for c in completions]
    return Rollout(samples, completions, logprobs, truncated, cfg.n_samples_per_prompt, stops)
