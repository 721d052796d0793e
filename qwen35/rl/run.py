"""`qwen35 rl CONFIG.yaml [--section.key value ...]`: a GRPO run, written out like `train`'s loop.

    claim the output directory -> tokenizer -> prompts -> policy (qwen35.build: LoRA, QLoRA,
    FSDP2 as for SFT) -> optimizer -> resume -> evaluate -> [GRPO step, log, evaluate, save]
    -> export

The machinery of a safe run is SFT's own (`qwen35.train`): `rundir` owns the output directory,
`checkpoint` writes DCP checkpoints atomically, SIGTERM/SIGINT end the run after the current
step with a checkpoint. A checkpoint holds the trainable weights, the optimizer, the schedule,
each rank's position in its prompt stream and each rank's RNG state (the sampling draws from the
global generator, seeded with `train.seed + rank`), so a resumed run samples exactly what the
uninterrupted one would have.

Under torchrun each rank samples `train.prompts_per_step / ranks` prompts of its own stream and
decodes them with the whole model gathered (`qwen35.parallel.fsdp.gathered_for_decoding`);
the updates run sharded (`qwen35.rl.trainer`).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from qwen35.build import build_model, load_tokenizer
from qwen35.errors import UserError
from qwen35.parallel.fsdp import gathered_for_decoding
from qwen35.rl.collect import evaluate
from qwen35.rl.config import RLRunConfig
from qwen35.rl.data import PromptExample, load_prompts
from qwen35.rl.rewards import check_prompts, resolve_reward
from qwen35.rl.rollout import SamplingConfig
from qwen35.rl.trainer import DataParallel, grpo_step
from qwen35.train import checkpoint as ckpt
from qwen35.train import guards
from qwen35.train.metrics import MetricsLogger
from qwen35.train.optim import build_optimizer, build_scheduler
from qwen35.train.setup import Runtime, export_model
from qwen35.train.trainer import _claim_output_dir


class PromptStream:
    """This rank's endless draw of prompts: pass after pass over the prompts, each pass in a fresh
    order from `seed`; rank r of W takes positions r, r + W, ... of that sequence. `cursor` (the
    prompts drawn so far) is the whole state."""

    def __init__(self, examples: list[PromptExample], seed: int, rank: int = 0, world_size: int = 1):
        self.examples, self.seed, self.rank, self.world_size = examples, seed, rank, world_size
        self.cursor = 0
        self._orders: dict[int, list[int]] = {}

    def take(self, k: int) -> list[PromptExample]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.cursor * self.world_size + self.rank, len(self.examples))
            if epoch not in self._orders:
                self._orders = {epoch: torch.randperm(len(self.examples),
                                                      generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()}
            out.append(self.examples[self._orders[epoch][i]])
            self.cursor += 1
        return out


@dataclass
class RLResult:
    output_dir: Path
    steps: int
    export_dir: Path | None
    stopped_by_signal: int = 0
    eval_pass_at_1: float | None = None  # after the last step, when eval.path is set


def _prompts(cfg: RLRunConfig, path: str, tokenizer, what: str, limit: int = 0) -> list[PromptExample]:
    examples = load_prompts(path, tokenizer, cfg.data.input_key, cfg.data.label_key, limit=limit or None,
                            template_kwargs=cfg.data.template_kwargs)
    if cfg.data.max_prompt_length:
        examples = [e for e in examples if len(e.prompt_ids) <= cfg.data.max_prompt_length]
    if not examples:
        raise UserError(f"{what} {path}: no prompt (of at most data.max_prompt_length tokens)")
    try:
        check_prompts(cfg.grpo.reward, [e.prompt_text for e in examples])
    except ValueError as e:
        raise UserError(f"{what} {path}: {e}") from None
    return examples


def _summed_over_ranks(metrics: dict, dp: DataParallel) -> dict:
    """One record of the step for all ranks: counts and rates summed, maxima the max, the rest
    the mean of the ranks' values."""
    if dp.size == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    summed, maxed = dp.sum(values), dp.max(values)
    out = {}
    for k, s, m in zip(keys, summed.tolist(), maxed.tolist()):
        if k.endswith("_max"):
            out[k] = m
        elif k.startswith("groups_") or k.startswith("reward_errors") or k.startswith("reward_timeouts") \
                or k == "rollout_tokens_per_s":
            out[k] = s
        elif k in ("policy_loss", "clip_fraction", "kl", "entropy", "grad_norm", "updates", "train_tokens_per_s"):
            out[k] = metrics[k]  # already the step's over all ranks
        else:
            out[k] = s / dp.size
    return out


def _evaluate(policy, examples, reward_fn, decode, cfg: RLRunConfig, rt: Runtime, dp: DataParallel, step: int,
              autocast) -> float:
    """Mean pass@1 over the held-out prompts (each rank samples its share), with a generator of
    its own so that evaluating leaves the training's sampling untouched."""
    mine = examples[rt.rank :: rt.world_size]
    sampling = SamplingConfig(n_samples_per_prompt=cfg.eval.n_samples_per_eval_prompt,
                              temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                              max_response_length=cfg.eval.max_response_length,
                              stop_token_ids=tuple(cfg.rollout.stop_token_ids), batch_size=cfg.rollout.batch_size)
    generator = torch.Generator(rt.device).manual_seed(cfg.train.seed * 1_000_003 + step * 101 + rt.rank)
    with gathered_for_decoding(policy, cfg.parallel.reshard_after_forward), autocast():
        mean = evaluate(policy, mine, reward_fn, decode, sampling, generator) if mine else 0.0
    count = len(mine) * sampling.n_samples_per_prompt
    totals = dp.sum(torch.tensor([mean * count, float(count)], dtype=torch.float64))
    return float(totals[0] / totals[1])


def run_rl(cfg: RLRunConfig) -> RLResult:
    if cfg.data.train_path is None:
        raise UserError("no prompts: set data.train_path to a JSONL or parquet file of {prompt, label} records "
                        "(`qwen35 rl` without arguments runs the built-in arithmetic run)")
    if not cfg.model.path and not cfg.model.preset:
        raise UserError("no policy: set model.path to a Hugging Face model directory (or model.preset)")
    try:  # a bad name fails before any work
        reward_fn = resolve_reward(cfg.grpo.reward)
    except ValueError as e:
        raise UserError(f"grpo.reward: {e}") from None
    grpo = cfg.grpo.grpo(cfg.rollout, cfg.train.grad_clip)
    rt = Runtime.start(cfg)
    dp = DataParallel.from_process_group(rt.device)
    if cfg.train.prompts_per_step % rt.world_size:
        raise UserError(f"train.prompts_per_step ({cfg.train.prompts_per_step}) must be a multiple of the number "
                        f"of processes ({rt.world_size})")
    out_dir = Path(cfg.train.output_dir)
    run = _claim_output_dir(cfg, out_dir, rt)

    tokenizer = load_tokenizer(cfg)
    if cfg.data.chat_template is not None:
        tokenizer.chat_template = Path(cfg.data.chat_template).read_text(encoding="utf-8")
    train_prompts = _prompts(cfg, cfg.data.train_path, tokenizer, "data.train_path")
    eval_prompts = _prompts(cfg, cfg.eval.path, tokenizer, "eval.path", cfg.eval.limit) if cfg.eval.path else []
    rt.print(f"{len(train_prompts)} training prompts, {len(eval_prompts)} held-out prompts")

    torch.manual_seed(cfg.train.seed)  # fresh adapters (or a preset's weights) alike on every rank
    policy = build_model(cfg, rt, tokenizer)
    reference = None
    if grpo.loss.kl_coef:  # with adapters the base is the reference: the policy with them off
        reference = policy if cfg.lora.rank else build_model(replace(cfg, lora=replace(cfg.lora, rank=0)), rt,
                                                               tokenizer).requires_grad_(False).eval()
    optimizer = build_optimizer(policy, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps,
                                cfg.optim.cpu_offload)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.scheduler,
                                cfg.optim.min_lr_ratio)
    stream = PromptStream(train_prompts, cfg.data.seed, rt.rank, rt.world_size)
    torch.manual_seed(cfg.train.seed + rt.rank)  # the sampling's generator, one stream per rank
    step, last_checkpoint = 0, None
    if run.resume_from:
        last_checkpoint, state = ckpt.load_first_readable(list(run.resume_from), policy, optimizer, rt.print)
        scheduler.load_state_dict(state["scheduler"])
        stream.cursor = state["prompt_cursors"][rt.rank]
        step = state["step"]
        rt.print(f"resumed from {last_checkpoint} at step {step}")

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    gather = lambda m: gathered_for_decoding(m, cfg.parallel.reshard_after_forward)  # noqa: E731
    metrics = MetricsLogger(out_dir, cfg.log.tensorboard, enabled=rt.is_main)
    per_rank = cfg.train.prompts_per_step // rt.world_size

    def log_eval(at: int) -> float:
        value = _evaluate(policy, eval_prompts, reward_fn, decode, cfg, rt, dp, at, rt.autocast)
        metrics.log(at, **{"eval_pass@1": value})
        rt.print(f"step {at}: held-out mean pass@1 {value:.4f} ({len(eval_prompts)} prompts x "
                 f"{cfg.eval.n_samples_per_eval_prompt})")
        return value

    def save() -> None:
        nonlocal last_checkpoint
        cursors = torch.tensor([float(stream.cursor)])
        if dist.is_initialized():
            gathered = [torch.zeros(1) for _ in range(rt.world_size)]
            dist.all_gather(gathered, cursors.to(rt.device) if rt.device.type == "cuda" else cursors)
            cursors = torch.cat([g.cpu() for g in gathered])
        extra = {"scheduler": scheduler.state_dict(), "prompt_cursors": [int(c) for c in cursors.tolist()]}
        last_checkpoint = ckpt.save_checkpoint(out_dir / "checkpoints", step, policy, optimizer, extra,
                                               cfg.checkpoint.keep_last, run.run_id)

    if eval_prompts and step == 0:
        log_eval(0)
    signum, final_eval = 0, None
    with guards.StopSignal() as stop:
        while step < cfg.train.max_steps:
            start = time.perf_counter()
            scalars = grpo_step(policy, optimizer, stream.take(per_rank), reward_fn, decode, grpo,
                                reference=reference, more_prompts=stream.take, data_parallel=dp, gather=gather,
                                autocast=rt.autocast)
            scheduler.step()
            step += 1
            scalars = _summed_over_ranks(scalars, dp)
            scalars.update(lr=scheduler.get_last_lr()[0], step_seconds=time.perf_counter() - start,
                           memory_gb=rt.peak_memory_gb())
            signum, _ = guards.agree(stop.signum, False, rt.device)
            if step % cfg.train.log_steps == 0:
                metrics.log(step, **scalars)
                rt.print(f"step {step}: reward {scalars['reward_mean']:.3f}, response length "
                         f"{scalars['response_length_mean']:.0f}, {scalars['step_seconds']:.1f} s")
            if eval_prompts and cfg.eval.steps and step % cfg.eval.steps == 0 and step < cfg.train.max_steps:
                log_eval(step)
            if signum or (cfg.train.save_steps and step % cfg.train.save_steps == 0):
                save()
            if signum:
                rt.print(f"stopped by {signal.Signals(signum).name} at step {step} with checkpoint {last_checkpoint}; "
                         "continue with --train.resume true")
                break
    export_dir = None
    if not signum:
        if eval_prompts:
            final_eval = log_eval(step)
        if last_checkpoint != out_dir / "checkpoints" / f"step_{step:08d}":
            save()
        if cfg.checkpoint.export_final:
            export_dir = out_dir / "final"
            with ckpt.atomic_directory(export_dir) as partial:
                export_model(policy, tokenizer, partial, rt)
            rt.print(f"exported the final policy to {export_dir}")
    metrics.close()
    return RLResult(out_dir, step, export_dir, signum, final_eval)
