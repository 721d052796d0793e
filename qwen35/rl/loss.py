"""The GRPO objective: group-normalised advantages and a clipped policy loss per token.

Everything here works on flat tensors over the loss tokens (completion tokens) of a micro-batch:
`logp_N` from the current policy, `old_logp_N` from the policy that sampled (π_old, recomputed by
a forward before the updates), `advantages_N` broadcast from each completion to its tokens, and
`weights_N`, each token's share of the optimizer step's loss. The weights carry the aggregation,
so that micro-batches and ranks only add up: for `token_mean` every token weighs 1 / (loss tokens
of the whole step, all micro-batches and ranks), the normalisation SFT uses; for
`seq_mean_token_mean` a token of completion i weighs 1 / (len_i · completions in the step).
docs/rl.md sets these next to what verl, TRL and miles call them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_TYPES = ("k1", "k2", "k3", "low_var_kl")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
ADVANTAGE_SCALES = ("std", "none")


@dataclass(frozen=True)
class LossConfig:
    eps_clip: float = 0.2  # ratio floor 1 - eps_clip
    eps_clip_high: float = 0.28  # ratio ceiling 1 + eps_clip_high (DAPO's clip-higher)
    dual_clip: float = 0.0  # c > 1: for A < 0 the loss is at most -c·A (verl uses 3); 0 = off
    kl_coef: float = 0.0  # 0: no reference model is needed
    kl_type: str = "low_var_kl"
    kl_ratio_weighted: bool = False  # KL_t times ρ_t: unbiased reverse-KL gradient off-policy (DeepSeek-V3.2)
    entropy_coef: float = 0.0  # > 0 rewards entropy (subtracted from the loss)
    aggregation: str = "token_mean"

    def __post_init__(self):
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"loss.kl_type must be one of {KL_TYPES}, got {self.kl_type!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.dual_clip and self.dual_clip <= 1.0:
            raise ValueError(f"loss.dual_clip must be > 1 (or 0 for off), got {self.dual_clip}")
        if self.eps_clip < 0 or self.eps_clip_high < 0:
            raise ValueError("loss.eps_clip and loss.eps_clip_high must be >= 0")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """`(r - mean) / (std + eps)` within each group of `group_size` consecutive completions of one
    prompt, with the unbiased (n - 1) std as verl, miles and TRL use; `scale="none"` keeps only the
    centring (Dr. GRPO). A group whose rewards all agree gets advantage 0."""
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "std":
        if group_size < 2:
            raise ValueError("std-normalised advantages need at least 2 samples per prompt")
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def token_weights(lengths: list[int], aggregation: str, step_tokens: int, step_sequences: int) -> torch.Tensor:
    """Each loss token's weight, for completions of `lengths` tokens (in order), given the step's
    totals over all micro-batches and ranks."""
    if aggregation == "token_mean":
        return torch.full((sum(lengths),), 1.0 / max(step_tokens, 1))
    if aggregation == "seq_mean_token_mean":
        return torch.cat([torch.full((n,), 1.0 / (n * step_sequences)) for n in lengths if n])
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token estimates of KL(π || π_ref) from samples of π, with `lr = logp - ref_logp`:
    k1 = lr, k2 = lr²/2, k3 = exp(-lr) - 1 + lr (Schulman's unbiased, positive estimator, as TRL
    computes it), low_var_kl = k3 with verl's clamps (lr to ±20, the result to ±10)."""
    log_ratio = logp - ref_logp
    if kl_type == "k1":
        return log_ratio
    if kl_type == "k2":
        return 0.5 * log_ratio.square()
    if kl_type == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    if kl_type == "low_var_kl":
        log_ratio = log_ratio.clamp(-20, 20)
        return (torch.exp(-log_ratio) - 1 + log_ratio).clamp(-10, 10)
    raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")


@dataclass
class LossOutput:
    loss: torch.Tensor  # this micro-batch's share of the step loss: backward on it
    policy_loss: torch.Tensor  # weighted sums, detached, for the step's metrics
    clip_fraction: torch.Tensor  # weighted share of tokens whose ratio was clipped
    kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def grpo_loss(logp_N, old_logp_N, advantages_N, weights_N, cfg: LossConfig,
              ref_logp_N=None, entropy_N=None) -> LossOutput:
    """Σ_t w_t · (max(-ρ_t·A_t, -clip(ρ_t, 1-ε, 1+ε_high)·A_t) + β·KL_t - c_H·H_t), with
    ρ_t = exp(logp_t - old_logp_t) (the log-ratio clamped to ±20, as verl does, against
    overflow); with dual clip, the policy term of a token with A_t < 0 is at most -c·A_t; with
    `kl_ratio_weighted`, KL_t is multiplied by ρ_t (TRL's default `use_bias_correction_kl`)."""
    log_ratio = (logp_N - old_logp_N).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages_N * ratio
    clipped = -advantages_N * ratio.clamp(1.0 - cfg.eps_clip, 1.0 + cfg.eps_clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if cfg.dual_clip:
        per_token = torch.where(advantages_N < 0, torch.minimum(per_token, -advantages_N * cfg.dual_clip), per_token)
    policy = (weights_N * per_token).sum()
    loss = policy
    out = LossOutput(loss, policy.detach(), (weights_N * (clipped > unclipped).float()).sum())
    if cfg.kl_coef:
        if ref_logp_N is None:
            raise ValueError("kl_coef > 0 needs the reference model's log-probs")
        kl_N = kl_penalty(logp_N, ref_logp_N, cfg.kl_type)
        kl = (weights_N * (kl_N * ratio if cfg.kl_ratio_weighted else kl_N)).sum()
        loss = loss + cfg.kl_coef * kl
        out.kl = kl.detach()
    if cfg.entropy_coef:
        if entropy_N is None:
            raise ValueError("entropy_coef > 0 needs the per-token entropy")
        entropy = (weights_N * entropy_N).sum()
        loss = loss - cfg.entropy_coef * entropy
        out.entropy = entropy.detach()
    out.loss = loss
    return out
