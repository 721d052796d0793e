"""One GRPO step, top to bottom: rollout -> rewards -> advantages -> π_old -> clipped updates.

    1. sample `n_samples_per_prompt` completions of each prompt from the policy itself;
    2. score each completion with the reward function (failures score 0 and are counted), add
       the overlong penalty, drop groups whose rewards agree and refill (dynamic sampling);
       both optional, see `qwen35.rl.collect`;
    3. group-normalise the rewards into advantages, one per completion, broadcast to its tokens;
    4. π_old: the policy's log-probs of the completion tokens by a training forward (no grad),
       and the reference's when the KL coefficient is > 0. The rollout engine's own log-probs
       are compared with π_old's (the train-vs-rollout mismatch) but not used in the loss;
    5. `ppo_epochs` passes over the samples, each shuffled and cut into `mini_batches` optimizer
       steps; a step accumulates micro-batches whose token weights come from the whole step's
       totals (see `qwen35.rl.loss`), then clips the gradient norm and updates.

The first update of a step is exactly on-policy (ratio 1); later ones are off-policy by the
updates made since the rollout, which the clipping bounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qwen35.rl.data import PromptExample
from qwen35.rl.logprobs import completion_logprobs, pack_samples
from qwen35.rl.loss import LossConfig, group_advantages, grpo_loss, token_weights
from qwen35.rl.collect import collect_batch
from qwen35.rl.rewards import RewardFn
from qwen35.rl.rollout import Rollout, SamplingConfig


@dataclass(frozen=True)
class GRPOConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage_scale: str = "std"  # or "none" (Dr. GRPO)
    advantage_eps: float = 1e-6
    mini_batches: int = 1  # optimizer steps per pass over a rollout batch
    ppo_epochs: int = 1  # passes over a rollout batch
    micro_batch_size: int = 16  # samples per forward
    max_grad_norm: float = 1.0
    reward_timeout_s: float = 10.0
    dynamic_sampling: bool = False  # drop groups whose rewards agree, refill with more prompts
    max_sampling_rounds: int = 4
    overlong: str = "none"  # "mask": truncated completions leave the loss; "penalty": DAPO's
    overlong_buffer: int = 0  # tokens before max_response_length where the penalty starts
    overlong_penalty_factor: float = 1.0

    def __post_init__(self):
        if self.mini_batches < 1 or self.ppo_epochs < 1 or self.micro_batch_size < 1:
            raise ValueError("grpo.mini_batches, grpo.ppo_epochs and grpo.micro_batch_size must be >= 1")
        if self.overlong not in ("none", "mask", "penalty"):
            raise ValueError(f"grpo.overlong must be none, mask or penalty, got {self.overlong!r}")
        if self.overlong == "penalty" and not 0 < self.overlong_buffer <= self.sampling.max_response_length:
            raise ValueError("grpo.overlong penalty needs 0 < grpo.overlong_buffer <= rollout.max_response_length")


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def _logprobs_of(model, rollout: Rollout, indices: list[int], cfg: GRPOConfig) -> list[torch.Tensor]:
    """Per-sample completion log-probs under `model`, by training forwards of micro-batches."""
    out = []
    for chunk in _chunks(indices, cfg.micro_batch_size):
        samples = pack_samples([rollout.prompt_ids[i] for i in chunk], [rollout.completion_ids[i] for i in chunk],
                               next(model.parameters()).device)
        logp, _ = completion_logprobs(model, samples, cfg.sampling.temperature)
        out += list(logp.split(samples.completion_lengths))
    return out


def grpo_step(policy, optimizer, examples: Sequence[PromptExample], reward_fn: RewardFn,
              decode: Callable[[list[int]], str], cfg: GRPOConfig, generator: torch.Generator | None = None,
              reference=None, more_prompts: Callable[[int], Sequence[PromptExample]] | None = None,
              global_sum: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> dict:
    """One rollout batch and its updates; returns the step's metrics. `more_prompts(k)` supplies
    k further prompts for dynamic sampling; `global_sum` all-reduces a count over data-parallel
    ranks (identity on one process)."""
    n = cfg.sampling.n_samples_per_prompt
    start = time.perf_counter()
    batch = collect_batch(policy, examples, reward_fn, decode, cfg.sampling, generator, cfg.reward_timeout_s,
                          cfg.overlong_buffer if cfg.overlong == "penalty" else 0, cfg.overlong_penalty_factor,
                          cfg.dynamic_sampling, more_prompts, cfg.max_sampling_rounds)
    rollout_s = time.perf_counter() - start
    rollout = batch.rollout
    advantages = group_advantages(batch.rewards, n, cfg.advantage_scale, cfg.advantage_eps)
    # overlong "mask": truncated completions stay in their group's statistics but leave the loss
    in_loss = [not (cfg.overlong == "mask" and t) for t in rollout.truncated]

    # 4: π_old (and the reference) by training forwards; the engine's log-probs only compared
    everything = list(range(len(rollout.completion_ids)))
    old_logp = _logprobs_of(policy, rollout, everything, cfg)
    ref_logp = _logprobs_of(reference, rollout, everything, cfg) if cfg.loss.kl_coef else None
    engine = torch.tensor([v for row in rollout.logprobs for v in row])
    trained = torch.cat(old_logp).cpu() if old_logp else torch.zeros(0)
    delta = engine - trained

    # 5: updates
    start = time.perf_counter()
    policy.train()
    totals = {"policy_loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    updates, train_tokens = 0, 0
    order_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    for _ in range(cfg.ppo_epochs if everything else 0):  # dynamic sampling may keep no group
        order = torch.randperm(len(everything), generator=order_gen).tolist()
        for mini in _chunks(order, -(-len(order) // cfg.mini_batches)):
            lengths = [len(rollout.completion_ids[i]) if in_loss[i] else 0 for i in mini]
            step_tokens = int(global_sum(torch.tensor(sum(lengths))))
            step_sequences = int(global_sum(torch.tensor(sum(1 for n_tok in lengths if n_tok))))
            stats = {k: 0.0 for k in totals if k != "grad_norm"}
            for micro in _chunks(mini, cfg.micro_batch_size):
                packed = pack_samples([rollout.prompt_ids[i] for i in micro], [rollout.completion_ids[i] for i in micro],
                                      next(policy.parameters()).device)
                if not sum(len(rollout.completion_ids[i]) for i in micro if in_loss[i]):
                    continue
                logp, entropy = completion_logprobs(policy, packed, cfg.sampling.temperature, with_entropy=True)
                weights = token_weights(packed.completion_lengths, cfg.loss.aggregation, step_tokens, step_sequences)
                weights = weights * torch.cat([torch.full((len(rollout.completion_ids[i]),), float(in_loss[i]))
                                               for i in micro])
                adv = torch.cat([advantages[i].expand(len(rollout.completion_ids[i])) for i in micro])
                out = grpo_loss(logp, torch.cat([old_logp[i] for i in micro]), adv.to(logp.device),
                                weights.to(logp.device), cfg.loss,
                                ref_logp_N=torch.cat([ref_logp[i] for i in micro]) if ref_logp else None,
                                entropy_N=entropy)
                out.loss.backward()
                stats["policy_loss"] += out.policy_loss.item()
                stats["clip_fraction"] += out.clip_fraction.item()
                stats["kl"] += 0.0 if out.kl is None else out.kl.item()
                stats["entropy"] += (weights.to(entropy.device) * entropy.detach()).sum().item()
                train_tokens += packed.input_ids.shape[1]
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad],
                                                       cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in stats.items():
                totals[k] += v
            totals["grad_norm"] += float(grad_norm)
            updates += 1
    train_s = time.perf_counter() - start

    rewards = torch.tensor(batch.task_rewards)
    lengths = torch.tensor(batch.lengths, dtype=torch.float32)
    metrics = {
        "reward_mean": rewards.mean().item(),  # the task reward of every sample drawn, before shaping
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "accuracy": (rewards >= 1.0).float().mean().item(),
        "groups_kept": len(rollout.completion_ids) // n,
        "groups_dropped": batch.groups_dropped,
        "sampling_rounds": batch.rounds,
        "reward_errors": batch.errors,
        "reward_timeouts": batch.timeouts,
        "response_length_mean": lengths.mean().item(),
        "response_length_max": int(lengths.max()),
        "truncation_ratio": sum(batch.truncated) / len(batch.truncated),
        # mismatch of the engine's log-probs against the training forward's (pi_old), and
        # KL(rollout || train) estimated from the rollout's own samples
        "logprob_mismatch_mean": delta.abs().mean().item() if delta.numel() else 0.0,
        "logprob_mismatch_max": delta.abs().max().item() if delta.numel() else 0.0,
        "logprob_mismatch_kl": delta.mean().item() if delta.numel() else 0.0,
        "updates": updates,
        "rollout_tokens_per_s": lengths.sum().item() / max(rollout_s, 1e-9),
        "train_tokens_per_s": train_tokens / max(train_s, 1e-9),
    }
    metrics.update({k: v / max(updates, 1) for k, v in totals.items()})
    if not cfg.loss.kl_coef:
        del metrics["kl"]
    return metrics
