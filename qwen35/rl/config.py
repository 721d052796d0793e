"""The GRPO run config: the sections of `qwen35 rl CONFIG.yaml --section.key value`.

Read by the same parser as `qwen35 train` (`qwen35.train.config_parser`): typed keys, an unknown
key names the closest one, `--help` lists them all. The model, optimizer, adapter, checkpoint,
log and parallel sections are `train`'s own; the data and train sections are GRPO's (prompts and
labels rather than conversations, steps of rollouts rather than packed rows), and `rollout`,
`grpo` and `eval` are new. docs/rl.md sets each key next to its verl, TRL and miles name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qwen35.rl.loss import LossConfig
from qwen35.rl.rollout import SamplingConfig
from qwen35.rl.trainer import GRPOConfig
from qwen35.train.config import (CheckpointConfig, LogConfig, LoraConfig, ModelConfig, OptimConfig, ParallelConfig,
                                 option)


@dataclass
class PromptDataConfig:
    """The prompts to train on: JSONL, JSON or parquet records with a prompt and a label."""

    train_path: str | None = option(
        None, "Prompt records (dapo-math-17k's layout: {prompt: string or [{role, content}], label}); "
        "null: the built-in arithmetic task", path=True)
    input_key: str = option("prompt", "Record key of the prompt (a string, or a list of chat messages)")
    label_key: str = option("label", "Record key of the label the reward checks against")
    template_kwargs: dict[str, Any] = option(
        {}, "Extra chat-template variables, e.g. {enable_thinking: false}")
    chat_template: str | None = option(
        None, "A Jinja chat template file to render the prompts with instead of the tokenizer's own", path=True)
    max_prompt_length: int = option(0, "Prompts longer than this many tokens are left out (counted); 0: keep all")
    seed: int = option(42, "Seed for the prompt order (reshuffled every pass over the prompts)")


@dataclass
class RolloutConfig:
    """Sampling the completions (the policy's own decoding, current weights)."""

    n_samples_per_prompt: int = option(8, "Completions sampled per prompt: the GRPO group")
    temperature: float = option(1.0, "Sampling temperature; 0: greedy")
    top_p: float = option(1.0, "Nucleus sampling threshold; 1: off")
    top_k: int = option(0, "Sample among the k most likely tokens; 0: off")
    max_response_length: int = option(1024, "Longest completion in tokens (it is then truncated)")
    stop_token_ids: list[int] = option([], "Token ids that end a completion besides the model's eos")
    batch_size: int = option(256, "Sequences decoded together")


@dataclass
class GrpoConfig:
    """Rewards, advantages, the clipped policy loss and the updates per rollout batch."""

    reward: str = option("math", "math, deepscaler, exact, or a Python function module:function "
                         "(prompt, completion, label) -> float")
    reward_timeout_s: float = option(10.0, "A user reward function running longer scores 0 (counted)")
    advantage_scale: Literal["std", "none"] = option(
        "std", "Advantages (r - mean) / (std + eps) per prompt group; none: r - mean (Dr. GRPO)")
    advantage_eps: float = option(1e-6, "eps in the advantage's denominator")
    eps_clip: float = option(0.2, "PPO ratio floor 1 - eps_clip")
    eps_clip_high: float = option(0.28, "PPO ratio ceiling 1 + eps_clip_high (DAPO's clip-higher)")
    dual_clip: float = option(0.0, "c > 1: the loss of a token with negative advantage is at most -c*A; 0: off")
    kl_coef: float = option(0.0, "Weight of the KL to the reference (the starting model; with LoRA the base "
                            "with adapters off); 0: no reference forward")
    kl_type: Literal["k1", "k2", "k3", "low_var_kl"] = option("low_var_kl", "KL estimator")
    entropy_coef: float = option(0.0, "Weight of the entropy bonus; 0: off")
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = option(
        "token_mean", "token_mean: every loss token of the optimizer step (all micro-batches and ranks) "
        "weighs the same; seq_mean_token_mean: each completion's mean, then the mean over completions")
    mini_batches: int = option(1, "Optimizer steps per pass over a rollout batch")
    ppo_epochs: int = option(1, "Passes over each rollout batch")
    micro_batch_size: int = option(16, "Samples per training forward on each rank")
    dynamic_sampling: bool = option(
        False, "Drop prompt groups whose rewards all agree and sample more prompts to refill (DAPO)")
    max_sampling_rounds: int = option(4, "Rounds of sampling per step with dynamic sampling")
    overlong: Literal["none", "mask", "penalty"] = option(
        "none", "Truncated completions: kept (none), left out of the loss (mask), or DAPO's soft length "
        "penalty (penalty)")
    overlong_buffer: int = option(0, "penalty: tokens before max_response_length where it starts")
    overlong_penalty_factor: float = option(1.0, "penalty: its value at max_response_length")

    def grpo(self, rollout: RolloutConfig, grad_clip: float = 1.0) -> GRPOConfig:
        """The step's settings in the form `qwen35.rl.trainer` takes."""
        sampling = SamplingConfig(
            n_samples_per_prompt=rollout.n_samples_per_prompt, temperature=rollout.temperature, top_p=rollout.top_p,
            top_k=rollout.top_k, max_response_length=rollout.max_response_length,
            stop_token_ids=tuple(rollout.stop_token_ids), batch_size=rollout.batch_size)
        loss = LossConfig(eps_clip=self.eps_clip, eps_clip_high=self.eps_clip_high, dual_clip=self.dual_clip,
                          kl_coef=self.kl_coef, kl_type=self.kl_type, entropy_coef=self.entropy_coef,
                          aggregation=self.aggregation)
        return GRPOConfig(
            sampling=sampling, loss=loss, advantage_scale=self.advantage_scale, advantage_eps=self.advantage_eps,
            mini_batches=self.mini_batches, ppo_epochs=self.ppo_epochs, micro_batch_size=self.micro_batch_size,
            max_grad_norm=grad_clip if grad_clip > 0 else float("inf"), reward_timeout_s=self.reward_timeout_s,
            dynamic_sampling=self.dynamic_sampling, max_sampling_rounds=self.max_sampling_rounds,
            overlong=self.overlong, overlong_buffer=self.overlong_buffer,
            overlong_penalty_factor=self.overlong_penalty_factor)


@dataclass
class EvalConfig:
    """Periodic evaluation on held-out prompts: mean pass@1, logged as eval_pass@1."""

    path: str | None = option(None, "Held-out prompt records (as data.train_path); null: no evaluation",
                              path=True)
    steps: int = option(0, "Evaluate every N steps, and before the first; 0: only before and after the run")
    n_samples_per_eval_prompt: int = option(1, "Samples per held-out prompt (miles: 16 on AIME)")
    temperature: float = option(0.0, "Sampling temperature of the evaluation; 0: greedy")
    top_p: float = option(1.0, "Nucleus sampling threshold of the evaluation")
    max_response_length: int = option(1024, "Longest evaluated completion in tokens")
    limit: int = option(0, "Evaluate the first N prompts only; 0: all")


@dataclass
class RLTrainConfig:
    """The length of the run, and where it writes."""

    max_steps: int = option(100, "GRPO steps (rollout batches) to run")
    prompts_per_step: int = option(32, "Prompts sampled per step over all data-parallel ranks (miles' "
                                   "rollout_batch_size)")
    output_dir: str = option("outputs/rl", "Directory for checkpoints, exports and logs", path=True)
    save_steps: int = option(50, "Save a resumable checkpoint every N steps; 0: only at the end")
    resume: bool | str = option(
        False, "false: a fresh run (refused if output_dir holds another run); true: continue from output_dir's "
        "latest checkpoint; auto: continue if there is one; a path: a checkpoint or output directory", path=True)
    overwrite_output_dir: bool = option(
        False, "Let a fresh run take over an output_dir that holds another run (its record is deleted first)")
    log_steps: int = option(1, "Log metrics every N steps")
    seed: int = option(42, "Seed of the sampling (each rank adds its rank) and of fresh adapters")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this; 0: no clipping")
    compile: bool = option(False, "torch.compile each decoder layer")
    activation_checkpointing: Literal["none", "selective", "full", "offload"] = option(
        "none", "Recompute activations in the backward pass to save memory (as for train)")


@dataclass
class RLRunConfig:
    """One GRPO run: the sections above, each a flat dataclass."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, scheduler="constant"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        try:  # the step's own checks (ranges, combinations), with the keys named as here
            self.grpo.grpo(self.rollout)
        except ValueError as e:
            raise ValueError(f"run config: {e}") from None
        _check(self)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                for f in dataclasses.fields(self)}

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check(cfg: RLRunConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"run config: {message}")

    need(cfg.model.path is None or cfg.model.preset is None, "model.path and model.preset are exclusive")
    for key, value in (("train.max_steps", cfg.train.max_steps), ("train.prompts_per_step", cfg.train.prompts_per_step),
                       ("train.log_steps", cfg.train.log_steps), ("optim.lr", cfg.optim.lr),
                       ("eval.n_samples_per_eval_prompt", cfg.eval.n_samples_per_eval_prompt),
                       ("eval.max_response_length", cfg.eval.max_response_length)):
        need(value > 0, f"{key} must be > 0, got {value}")
    for key, value in (("train.save_steps", cfg.train.save_steps), ("eval.steps", cfg.eval.steps),
                       ("eval.limit", cfg.eval.limit), ("data.max_prompt_length", cfg.data.max_prompt_length),
                       ("train.grad_clip", cfg.train.grad_clip), ("lora.rank", cfg.lora.rank),
                       ("optim.warmup_steps", cfg.optim.warmup_steps), ("checkpoint.keep_last", cfg.checkpoint.keep_last)):
        need(value >= 0, f"{key} must be >= 0, got {value}")
    need(cfg.eval.temperature >= 0 and 0 < cfg.eval.top_p <= 1, "eval.temperature must be >= 0 and eval.top_p in (0, 1]")
    need(cfg.grpo.advantage_scale == "none" or cfg.rollout.n_samples_per_prompt > 1,
         "grpo.advantage_scale std needs rollout.n_samples_per_prompt >= 2")
    need(cfg.lora.quantize_base == "none" or cfg.lora.rank > 0, "lora.quantize_base needs lora.rank > 0 (QLoRA)")
    need(cfg.lora.rank == 0 or cfg.model.path is not None, "lora.rank > 0 needs model.path")
    need(cfg.parallel.sp == 1 and cfg.parallel.cp == 1 and cfg.parallel.ep == 1,
         "parallel.sp, parallel.cp and parallel.ep are for train; a GRPO run shards with FSDP only")
    need(cfg.checkpoint.export_steps == 0, "checkpoint.export_steps is for train; a GRPO run exports at the end")
    need((cfg.optim.name, cfg.optim.weights, cfg.optim.in_backward) == ("adamw", "float32", False),
         "optim.name, optim.weights and optim.in_backward are for train; a GRPO run trains with AdamW on "
         "float32 weights")
