"""The training loop, written out: load, prepare data, step, log, evaluate, save, export.

One process or many (torchrun): FSDP shards the model over all ranks, each data-parallel replica
(`parallel.sp` or `parallel.cp` ranks sharing rows, `qwen35.parallel`) reads its share of the packed
rows, and the loss is normalised by the loss tokens of the whole step over all ranks (one
all-reduce of the count per step).

What keeps a run safe (README, "Runs and output directories"): the output directory is claimed
for this run before any work (`rundir`); a step whose loss or gradient norm is not finite is
skipped, and `train.max_nonfinite_steps` of them in a row stop the run; SIGTERM/SIGINT end the
run after the current step with one checkpoint, on a step every rank agrees on; checkpoints and
exports are written aside and renamed into place once complete.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from qwen35.errors import TrainingDiverged, UserError
from qwen35.parallel.expert import clip_grad_norm_ as expert_clip_grad_norm_
from qwen35.progress import progress
from qwen35.train import checkpoint as ckpt
from qwen35.train import guards, rundir
from qwen35.train.config import RunConfig
from qwen35.train.flops import PEAK_BF16_FLOPS, flops_per_token
from qwen35.train.metrics import MetricsLogger, WandbSettings
from qwen35.train.optim import build_optimizer, build_scheduler, clip_gradients
from qwen35.build import build_model, is_vision_language, load_tokenizer
from qwen35.train.setup import Runtime, export_model, prepare_data
from qwen35.train.step import forward_backward, model_inputs


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    export_dir: Path | None
    stopped_by_signal: int = 0  # SIGTERM/SIGINT number when a signal ended the run early; 0: it ran to the end
    skipped_steps: int = 0  # steps whose loss or gradient norm was not finite


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _global_count(n: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        n = n.clone()
        dist.all_reduce(n)
    return n


@torch.no_grad()
def evaluate_loss(model, batches, rt: Runtime) -> float:
    total, count = loss_totals(model, batches, rt)
    return total / max(count, 1)


def loss_totals(model, batches, rt: Runtime) -> tuple[float, int]:
    """The summed loss and the number of loss tokens over `batches` (and over all ranks)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = _to_device(batch, rt.device)
        with rt.autocast():
            out = model(**model_inputs(batch), labels=batch["labels"])
        total += float(_global_count(out.loss_sum.detach()))
        count += int(_global_count(out.num_loss_tokens))
    model.train()
    return total, count


def train(cfg: RunConfig) -> TrainResult:
    rt = Runtime.start(cfg)
    out_dir = Path(cfg.train.output_dir)
    run = _claim_output_dir(cfg, out_dir, rt)
    torch.manual_seed(cfg.train.seed)

    tokenizer = load_tokenizer(cfg)
    # before the model: a bad data file costs no model load
    data = prepare_data(cfg, tokenizer, rt, is_vision_language(cfg))
    model = build_model(cfg, rt, tokenizer)
    rows_per_rank_step = cfg.train.global_batch_size // rt.dp_size
    accumulation = rows_per_rank_step // cfg.train.micro_batch_size
    if accumulation * cfg.train.micro_batch_size * rt.dp_size != cfg.train.global_batch_size:
        raise UserError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) x data-parallel ranks "
            f"({rt.dp_size} = processes / parallel.sp or parallel.cp)"
        )
    steps_per_epoch = max(1, data.train_rows // cfg.train.global_batch_size)
    total_steps = cfg.train.max_steps or cfg.train.num_epochs * steps_per_epoch

    # Experts and the rest live on different meshes under expert parallelism.
    clip_grad_norm = expert_clip_grad_norm_ if cfg.parallel.ep > 1 else torch.nn.utils.clip_grad_norm_
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps,
                                cfg.optim.cpu_offload, cfg.optim.name, cfg.optim.weights, cfg.optim.in_backward)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, total_steps, cfg.optim.scheduler, cfg.optim.min_lr_ratio)
    step = 0
    last_checkpoint = None  # for the message when the run diverges
    if run.resume_from:
        last_checkpoint, state = ckpt.load_first_readable(list(run.resume_from), model, optimizer, rt.print)
        scheduler.load_state_dict(state["scheduler"])
        data.loader.load_state_dict(state["loader"])
        step = state["step"]
        rt.print(f"resumed from {last_checkpoint} at step {step}")

    batches = iter(data.loader)  # from the resumed position on
    metrics = MetricsLogger(out_dir, cfg.log.tensorboard, enabled=rt.is_main, wandb=_wandb_settings(cfg))
    flops_token = flops_per_token(model.config, cfg.data.seq_len)
    bar = progress(total_steps, "train", enabled=rt.is_main, initial=step, interval=cfg.log.progress_seconds)
    loss = float("nan")
    skipped = guards.NonFiniteSteps()
    signum = 0  # the stop signal every rank agreed on

    def refuse_nonfinite_weights(what: str) -> None:
        if not guards.weights_are_finite(model, rt.device):
            raise TrainingDiverged(f"the weights at step {step} are not finite, so they are not {what}. "
                                   f"{_last_checkpoint_text(last_checkpoint)}")

    def save() -> None:
        nonlocal last_checkpoint
        refuse_nonfinite_weights("saved")
        extra = {"scheduler": scheduler.state_dict(), "loader": data.loader.state_dict()}
        last_checkpoint = ckpt.save_checkpoint(out_dir / "checkpoints", step, model, optimizer, extra,
                                               cfg.checkpoint.keep_last, run.run_id)

    def export(directory: Path) -> None:
        refuse_nonfinite_weights("exported")
        with ckpt.atomic_directory(directory) as partial:
            export_model(model, tokenizer, partial, rt, data.image_processor, cfg.model.path, data.video_processor)

    with guards.StopSignal() as stop:
        while step < total_steps:
            start = time.perf_counter()
            micro = [_to_device(next(batches), rt.device) for _ in range(accumulation)]
            result = forward_backward(model, micro, _global_count, rt.autocast_dtype, cfg.train.router_z_loss_coef,
                                      rt.world_size, cfg.train.router_balance, rt.ranks_per_row)
            grad_norm = clip_gradients(optimizer, model.parameters(), cfg.train.grad_clip, clip_grad_norm)
            loss = float(result.loss)
            signum, nonfinite = guards.agree(stop.signum, not guards.is_finite(loss, float(grad_norm)), rt.device)
            if not nonfinite:  # a non-finite step changes nothing but the step count and the schedule
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            skipped.update(finite=not nonfinite)
            if nonfinite:
                rt.print(f"step {step}: loss {loss:.4g}, gradient norm {float(grad_norm):.4g}: not finite, step "
                         f"skipped ({skipped.in_a_row} in a row, {skipped.total} in all)")
            elapsed = time.perf_counter() - start
            tokens = sum(b["input_ids"].numel() for b in micro) * rt.dp_size
            tokens_per_s = tokens / elapsed
            scalars = dict(loss=loss, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                           tokens_per_s=tokens_per_s, memory_gb=rt.peak_memory_gb(), skipped_steps=skipped.total)
            if result.router is not None:
                scalars.update(_router_scalars(result.router))
            if rt.device.type == "cuda":
                scalars["mfu"] = flops_token * tokens_per_s / (PEAK_BF16_FLOPS * rt.world_size)
            if cfg.train.eval_steps and step % cfg.train.eval_steps == 0 and data.val_batches:
                scalars["eval_loss"] = evaluate_loss(model, data.val_batches, rt)
            if step % cfg.train.log_steps == 0 or "eval_loss" in scalars or nonfinite:
                metrics.log(step, **scalars)
            bar.set_postfix({k: f"{v:.3g}" for k, v in scalars.items()}, refresh=False)
            bar.update(1)
            limit = cfg.train.max_nonfinite_steps
            if limit and skipped.in_a_row >= limit:
                bar.close()
                metrics.close()
                raise TrainingDiverged(_diverged_text(f"for {limit} steps in a row", step, limit, last_checkpoint))
            if cfg.checkpoint.export_steps and step % cfg.checkpoint.export_steps == 0:
                export(out_dir / f"export_step_{step:08d}")
            if signum or (cfg.train.save_steps and step % cfg.train.save_steps == 0):
                save()
            if signum:
                rt.print(f"stopped by {signal.Signals(signum).name} at step {step} with checkpoint {last_checkpoint}; "
                         f"continue with --train.resume true")
                break
    bar.close()
    metrics.close()
    export_dir = None
    if not signum and skipped.in_a_row:  # weights that gave a non-finite loss at the end are no result
        raise TrainingDiverged(_diverged_text("at the end of the run", step, skipped.in_a_row, last_checkpoint,
                                              ", so nothing is exported as final"))
    if not signum:
        if last_checkpoint != out_dir / "checkpoints" / f"step_{step:08d}":  # not saved at this step yet
            save()
        if cfg.checkpoint.export_final:
            export_dir = out_dir / "final"
            export(export_dir)
            rt.print(f"exported the final model to {export_dir}")
    return TrainResult(out_dir, step, loss, export_dir, signum, skipped.total)


def _claim_output_dir(cfg: RunConfig, out_dir: Path, rt: Runtime) -> rundir.RunPlan:
    """Rank 0 decides what this run does with the output directory and writes run.json and the
    resolved config; the other ranks get its decision, or the same refusal."""
    plan = error = None
    if rt.is_main:
        try:
            plan = rundir.plan_run(cfg.train, out_dir)
            rundir.claim(out_dir, plan)
            cfg.save_yaml(out_dir / "run_config.yaml")
        except UserError as e:
            error = e
    if dist.is_initialized():
        shared = [plan, error]
        dist.broadcast_object_list(shared, src=0)
        plan, error = shared
    if error is not None:
        raise error
    return plan


def _diverged_text(when: str, step: int, in_a_row: int, last_checkpoint: Path | None, then: str = "") -> str:
    return (f"training diverged: the loss or gradient norm was not finite {when} (steps {step - in_a_row + 1} "
            f"to {step}; each was skipped){then}. {_last_checkpoint_text(last_checkpoint)}. Lower optim.lr or "
            "check the data, or raise train.max_nonfinite_steps")


def _last_checkpoint_text(path: Path | None) -> str:
    if path is None:
        return "This run has no checkpoint"
    return f"The last checkpoint is {path}"


def _wandb_settings(cfg: RunConfig) -> WandbSettings | None:
    if not cfg.log.wandb:
        return None
    name = cfg.log.wandb_run_name or Path(cfg.train.output_dir).resolve().name
    return WandbSettings(cfg.log.wandb_project, name, cfg.to_dict())


def _router_scalars(router: dict) -> dict:
    """MoE balance over all ranks: the step's router losses (each rank holds its share), and the
    busiest and idlest expert of any layer as a multiple of an even share (1.0 = balanced)."""
    losses = torch.stack([router["aux_loss"], router["z_loss"]])
    summed = _global_count(torch.cat([losses, router["tokens_per_expert"].flatten()]))  # one all-reduce
    counts = summed[2:].view_as(router["tokens_per_expert"])  # [layers, E]
    share = counts / counts.mean(dim=-1, keepdim=True).clamp(min=1)
    aux, z = summed[:2].tolist()
    return {"moe_aux_loss": aux, "moe_z_loss": z,
            "expert_load_max": float(share.max()), "expert_load_min": float(share.min())}
