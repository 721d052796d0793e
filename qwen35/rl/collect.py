"""A step's rollout batch: sample, score, shape the rewards, and keep the informative groups.

Dynamic sampling (DAPO): a group whose rewards all agree has advantage 0 for every completion and
teaches nothing, so it is dropped and more prompts are sampled until the batch again holds as
many groups as prompts were asked for (or `max_sampling_rounds` rounds have run; the batch is
then smaller). The overlong penalty (DAPO, verl's `overlong_buffer`) lowers the reward of a
completion longer than `max_response_length - buffer` linearly, by up to `factor` at the limit:
`min((max_len - buffer - len) / buffer * factor, 0)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qwen35.rl.data import PromptExample
from qwen35.rl.rewards import RewardFn, score_completions
from qwen35.rl.rollout import Rollout, SamplingConfig, sample_rollout


@dataclass
class RolloutBatch:
    rollout: Rollout  # the kept groups, n_samples_per_prompt consecutive samples each
    rewards: torch.Tensor  # [S] of the kept samples, after the overlong penalty
    # everything sampled this step, kept or not, for the metrics
    task_rewards: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    errors: int = 0
    timeouts: int = 0
    groups_dropped: int = 0
    rounds: int = 0


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float) -> torch.Tensor:
    """0 up to `max_length - buffer` tokens, then falling linearly to `-factor` at `max_length`."""
    return ((max_length - buffer - lengths.float()) / buffer * factor).clamp(max=0.0)


def select_groups(rollout: Rollout, groups: Sequence[int]) -> Rollout:
    n = rollout.group_size
    keep = [g * n + j for g in groups for j in range(n)]
    return Rollout([rollout.prompt_ids[i] for i in keep], [rollout.completion_ids[i] for i in keep],
                   [rollout.logprobs[i] for i in keep], [rollout.truncated[i] for i in keep], n,
                   rollout.stop_token_ids)


def _concat(a: Rollout | None, b: Rollout) -> Rollout:
    if a is None:
        return b
    return Rollout(a.prompt_ids + b.prompt_ids, a.completion_ids + b.completion_ids, a.logprobs + b.logprobs,
                   a.truncated + b.truncated, a.group_size, a.stop_token_ids)


def collect_batch(policy, examples: Sequence[PromptExample], reward_fn: RewardFn, decode: Callable[[list[int]], str],
                  sampling: SamplingConfig, generator: torch.Generator | None = None, reward_timeout_s: float = 10.0,
                  overlong_buffer: int = 0, overlong_penalty_factor: float = 1.0, dynamic_sampling: bool = False,
                  more_prompts: Callable[[int], Sequence[PromptExample]] | None = None,
                  max_sampling_rounds: int = 4) -> RolloutBatch:
    """Samples and scores `examples`; with `dynamic_sampling`, drops groups whose rewards agree and
    refills from `more_prompts(k)` (k prompts wanted) for up to `max_sampling_rounds` rounds."""
    n = sampling.n_samples_per_prompt
    wanted = len(examples)
    batch = RolloutBatch(rollout=None, rewards=torch.zeros(0))
    kept_rewards = []
    pending = list(examples)
    while pending:
        batch.rounds += 1
        rollout = sample_rollout(policy, [e.prompt_ids for e in pending], sampling, generator)
        texts = [decode(c) for c in rollout.completion_ids]
        scored = score_completions(reward_fn, [pending[i // n].prompt_text for i in range(len(texts))], texts,
                                   [pending[i // n].label for i in range(len(texts))], reward_timeout_s)
        lengths = [len(c) for c in rollout.completion_ids]
        batch.task_rewards += scored.rewards
        batch.lengths += lengths
        batch.truncated += rollout.truncated
        batch.errors += scored.errors
        batch.timeouts += scored.timeouts
        rewards = torch.tensor(scored.rewards, dtype=torch.float32)
        if overlong_buffer:
            rewards = rewards + overlong_penalty(torch.tensor(lengths), sampling.max_response_length,
                                                 overlong_buffer, overlong_penalty_factor)
        groups = rewards.view(-1, n)
        keep = list(range(len(pending)))
        if dynamic_sampling:
            keep = [g for g in keep if not bool((groups[g] == groups[g, 0]).all())]
            batch.groups_dropped += len(pending) - len(keep)
        room = wanted - len(kept_rewards)
        keep = keep[:room]
        batch.rollout = _concat(batch.rollout, select_groups(rollout, keep))
        kept_rewards += [groups[g] for g in keep]
        missing = wanted - len(kept_rewards)
        pending = []
        if dynamic_sampling and missing and more_prompts is not None and batch.rounds < max_sampling_rounds:
            pending = list(more_prompts(missing))
    batch.rewards = torch.cat(kept_rewards) if kept_rewards else torch.zeros(0)
    return batch


@torch.no_grad()
def evaluate(policy, examples: Sequence[PromptExample], reward_fn: RewardFn, decode: Callable[[list[int]], str],
             sampling: SamplingConfig, generator: torch.Generator | None = None) -> float:
    """Mean reward of `sampling.n_samples_per_prompt` samples of each held-out prompt: mean pass@1
    for a 0/1 reward (miles' evaluation on AIME with 16 samples per prompt); greedy at temperature 0."""
    if not examples:
        return 0.0
    n = sampling.n_samples_per_prompt
    rollout = sample_rollout(policy, [e.prompt_ids for e in examples], sampling, generator)
    texts = [decode(c) for c in rollout.completion_ids]
    scored = score_completions(reward_fn, [examples[i // n].prompt_text for i in range(len(texts))], texts,
                               [examples[i // n].label for i in range(len(texts))])
    return sum(scored.rewards) / len(scored.rewards)
