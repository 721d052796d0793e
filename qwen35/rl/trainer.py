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

Data parallel (torchrun + FSDP2, `qwen35.rl.run`): each rank samples its own prompts. Sampling
and the no-grad forwards of step 4 run inside `gather(model)`, where every rank holds the whole
model (`qwen35.parallel.fsdp.gathered_for_decoding`): ranks sample different lengths, and no
collective may depend on that. The updates do run sharded, so every rank runs the same number
of micro-batches per optimizer step (a rank with fewer adds empty ones of weight 0), and the
token weights come from the step's totals over all ranks (`DataParallel.sum`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from qwen35.lora import adapters_disabled
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


def _split(items: list, parts: int) -> list[list]:
    """`parts` near-equal consecutive pieces (some empty when there are fewer items)."""
    bounds = [len(items) * i // parts for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


@dataclass(frozen=True)
class DataParallel:
    """The ranks that share an optimizer step: their count and two all-reduces. One process by
    default; `DataParallel.from_process_group()` under torchrun."""

    size: int = 1
    device: torch.device | None = None

    @classmethod
    def from_process_group(cls, device: torch.device) -> DataParallel:
        if not dist.is_initialized():
            return cls()
        return cls(dist.get_world_size(), device)

    def _reduce(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.size == 1:
            return x
        y = x.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(y, op=op)
        return y.to(x.device)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, dist.ReduceOp.SUM) if self.size > 1 else x

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x, dist.ReduceOp.MAX) if self.size > 1 else x


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logprobs_of(model, rollout: Rollout, indices: list[int], cfg: GRPOConfig, autocast) -> list[torch.Tensor]:
    """Per-sample completion log-probs under `model`, by training forwards of micro-batches."""
    out = []
    for chunk in _chunks(indices, cfg.micro_batch_size):
        samples = pack_samples([rollout.prompt_ids[i] for i in chunk], [rollout.completion_ids[i] for i in chunk],
                               _device(model))
        with autocast():
            logp, _ = completion_logprobs(model, samples, cfg.sampling.temperature)
        out += list(logp.float().split(samples.completion_lengths))
    return out


def _no_gather(model):
    return contextlib.nullcontext()


def grpo_step(policy, optimizer, examples: Sequence[PromptExample], reward_fn: RewardFn,
              decode: Callable[[list[int]], str], cfg: GRPOConfig, generator: torch.Generator | None = None,
              reference=None, more_prompts: Callable[[int], Sequence[PromptExample]] | None = None,
              data_parallel: DataParallel = DataParallel(), gather=_no_gather,
              autocast=contextlib.nullcontext) -> dict:
    """One rollout batch and its updates; returns the step's metrics. `more_prompts(k)` supplies
    k further prompts for dynamic sampling. `reference` is the KL reference model (needed when
    `kl_coef > 0`); it is run with its adapters off, so a LoRA policy passes itself and its base
    is the reference. `gather(model)` is a context in which `model` is whole on every rank;
    `autocast()` the compute precision of the forwards."""
    start = time.perf_counter()
    with gather(policy):
        batch = collect_batch(policy, examples, reward_fn, decode, cfg.sampling, generator, cfg.reward_timeout_s,
                              cfg.overlong_buffer if cfg.overlong == "penalty" else 0, cfg.overlong_penalty_factor,
                              cfg.dynamic_sampling, more_prompts, cfg.max_sampling_rounds)
        rollout_s = time.perf_counter() - start
        # 4: π_old (and the reference) by training forwards; the engine's log-probs only compared
        everything = list(range(len(batch.rollout.completion_ids)))
        old_logp = _logprobs_of(policy, batch.rollout, everything, cfg, autocast)
    ref_logp = None
    if cfg.loss.kl_coef:
        if reference is None:
            raise ValueError("grpo: kl_coef > 0 needs a reference model")
        with gather(reference), adapters_disabled(reference):
            ref_logp = _logprobs_of(reference, batch.rollout, everything, cfg, autocast)
    metrics = policy_update(policy, optimizer, batch.rollout, batch.rewards, old_logp, cfg, generator, ref_logp,
                            data_parallel, autocast)
    metrics.update(rollout_metrics(batch, old_logp, cfg, rollout_s))
    if not cfg.loss.kl_coef:
        del metrics["kl"]
    return metrics


def policy_update(policy, optimizer, rollout: Rollout, rewards: torch.Tensor, old_logp: list[torch.Tensor],
                  cfg: GRPOConfig, generator: torch.Generator | None = None, ref_logp: list[torch.Tensor] | None = None,
                  data_parallel: DataParallel = DataParallel(), autocast=contextlib.nullcontext) -> dict:
    """Step 5: `ppo_epochs` passes of `mini_batches` optimizer steps over this rank's samples.
    Returns the mean over updates of the step's policy loss, clip fraction, KL, entropy (each
    summed over ranks) and gradient norm."""
    n = cfg.sampling.n_samples_per_prompt
    advantages = group_advantages(rewards, n, cfg.advantage_scale, cfg.advantage_eps)
    # overlong "mask": truncated completions stay in their group's statistics but leave the loss
    in_loss = [not (cfg.overlong == "mask" and t) for t in rollout.truncated]
    device = _device(policy)
    dp = data_parallel
    start = time.perf_counter()
    policy.train()
    totals = torch.zeros(4, dtype=torch.float64)  # policy_loss, clip_fraction, kl, entropy
    grad_norm_sum, updates, train_tokens = 0.0, 0, 0
    order_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    # a rank whose micro-batches run out runs this one, at weight 0: FSDP needs every rank's forwards
    empty = pack_samples([[0]], [[0]], device)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(rollout.completion_ids), generator=order_gen).tolist()
        for mini in _split(order, cfg.mini_batches):
            lengths = [len(rollout.completion_ids[i]) if in_loss[i] else 0 for i in mini]
            counts = dp.sum(torch.tensor([sum(lengths), sum(1 for k in lengths if k)], dtype=torch.float64))
            step_tokens, step_sequences = int(counts[0]), int(counts[1])
            if not step_tokens:  # no loss token on any rank (all masked, or no group kept): no update
                continue
            micros = [m for m in _chunks(mini, cfg.micro_batch_size)
                      if sum(len(rollout.completion_ids[i]) for i in m if in_loss[i])]
            rounds = int(dp.max(torch.tensor(float(len(micros)))))
            stats = torch.zeros(4, dtype=torch.float64)
            for k in range(rounds):
                if k >= len(micros):
                    with autocast():
                        logp, _ = completion_logprobs(policy, empty, cfg.sampling.temperature)
                    (logp.sum() * 0.0).backward()
                    continue
                micro = micros[k]
                packed = pack_samples([rollout.prompt_ids[i] for i in micro],
                                      [rollout.completion_ids[i] for i in micro], device)
                with autocast():
                    logp, entropy = completion_logprobs(policy, packed, cfg.sampling.temperature, with_entropy=True)
                weights = token_weights(packed.completion_lengths, cfg.loss.aggregation, step_tokens, step_sequences)
                weights = weights * torch.cat([torch.full((len(rollout.completion_ids[i]),), float(in_loss[i]))
                                               for i in micro])
                weights = weights.to(device)
                adv = torch.cat([advantages[i].expand(len(rollout.completion_ids[i])) for i in micro]).to(device)
                out = grpo_loss(logp, torch.cat([old_logp[i] for i in micro]).to(device), adv, weights, cfg.loss,
                                ref_logp_N=torch.cat([ref_logp[i] for i in micro]).to(device) if ref_logp else None,
                                entropy_N=entropy)
                # FSDP averages the ranks' gradients; each rank holds its share of the step's sum
                (out.loss * dp.size).backward()
                stats += torch.tensor([out.policy_loss.item(), out.clip_fraction.item(),
                                       0.0 if out.kl is None else out.kl.item(),
                                       (weights * entropy.detach()).sum().item()], dtype=torch.float64)
                train_tokens += packed.input_ids.shape[1]
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad],
                                                       cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            totals += dp.sum(stats)
            grad_norm_sum += float(grad_norm)
            updates += 1
    train_s = time.perf_counter() - start
    mean = (totals / max(updates, 1)).tolist()
    return {"policy_loss": mean[0], "clip_fraction": mean[1], "kl": mean[2], "entropy": mean[3],
            "grad_norm": grad_norm_sum / max(updates, 1), "updates": updates,
            "train_tokens_per_s": float(dp.sum(torch.tensor(float(train_tokens)))) / max(train_s, 1e-9)}


def rollout_metrics(batch, old_logp: list[torch.Tensor], cfg: GRPOConfig, rollout_s: float) -> dict:
    """What this rank sampled: rewards, lengths, truncation, dynamic sampling, and the mismatch of
    the engine's log-probs against the training forward's (π_old)."""
    rollout = batch.rollout
    engine = torch.tensor([v for row in rollout.logprobs for v in row])
    trained = torch.cat(old_logp).cpu() if old_logp else torch.zeros(0)
    delta = engine - trained
    rewards = torch.tensor(batch.task_rewards)
    lengths = torch.tensor(batch.lengths, dtype=torch.float32)
    return {
        "reward_mean": rewards.mean().item(),  # the task reward of every sample drawn, before shaping
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "accuracy": (rewards >= 1.0).float().mean().item(),
        "groups_kept": len(rollout.completion_ids) // cfg.sampling.n_samples_per_prompt,
        "groups_dropped": batch.groups_dropped,
        "sampling_rounds": batch.rounds,
        "reward_errors": batch.errors,
        "reward_timeouts": batch.timeouts,
        "response_length_mean": lengths.mean().item(),
        "response_length_max": int(lengths.max()),
        "truncation_ratio": sum(batch.truncated) / len(batch.truncated),
        # KL(rollout || train) estimated from the rollout's own samples
        "logprob_mismatch_mean": delta.abs().mean().item() if delta.numel() else 0.0,
        "logprob_mismatch_max": delta.abs().max().item() if delta.numel() else 0.0,
        "logprob_mismatch_kl": delta.mean().item() if delta.numel() else 0.0,
        "rollout_tokens_per_s": lengths.sum().item() / max(rollout_s, 1e-9),
    }
