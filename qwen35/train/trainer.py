"""The training loop, written out: load, prepare data, step, log, evaluate, save, export.

One process or many (torchrun): FSDP shards the model over all ranks, each data-parallel replica
(`parallel.sp` or `parallel.cp` ranks sharing rows, `qwen35.parallel`) reads its share of the packed
rows, and the loss is normalised by the loss tokens of the whole step over all ranks (one
all-reduce of the count per step).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from qwen35.train import checkpoint as ckpt
from qwen35.train.config import RunConfig
from qwen35.train.flops import PEAK_BF16_FLOPS, flops_per_token
from qwen35.train.metrics import MetricsLogger
from qwen35.train.optim import build_optimizer, build_scheduler
from qwen35.train.setup import Runtime, export_model, load_model_and_tokenizer, prepare_data
from qwen35.train.step import forward_backward


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    export_dir: Path | None


class _StopRequest:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _global_count(n: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        n = n.clone()
        dist.all_reduce(n)
    return n


@torch.no_grad()
def evaluate_loss(model, batches, rt: Runtime) -> float:
    model.eval()
    total = count = 0.0
    for batch in batches:
        batch = _to_device(batch, rt.device)
        with rt.autocast():
            out = model(batch["input_ids"], batch.get("position_ids"), batch.get("cu_seqlens"), labels=batch["labels"])
        total += float(_global_count(out.loss_sum.detach()))
        count += float(_global_count(out.num_loss_tokens))
    model.train()
    return total / max(count, 1.0)


def train(cfg: RunConfig) -> TrainResult:
    rt = Runtime.start(cfg)
    out_dir = Path(cfg.train.output_dir)
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out_dir / "run_config.yaml")
    torch.manual_seed(cfg.train.seed)

    model, tokenizer = load_model_and_tokenizer(cfg, rt)
    data = prepare_data(cfg, tokenizer, rt)
    rows_per_rank_step = cfg.train.global_batch_size // rt.dp_size
    accumulation = rows_per_rank_step // cfg.train.micro_batch_size
    if accumulation * cfg.train.micro_batch_size * rt.dp_size != cfg.train.global_batch_size:
        raise ValueError(
            f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) x data-parallel ranks "
            f"({rt.dp_size} = processes / parallel.sp or parallel.cp)"
        )
    steps_per_epoch = max(1, data.train_rows // cfg.train.global_batch_size)
    total_steps = cfg.train.max_steps or cfg.train.num_epochs * steps_per_epoch

    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps,
                                cfg.optim.cpu_offload)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, total_steps, cfg.optim.scheduler, cfg.optim.min_lr_ratio)
    step = 0
    resume_from = _resume_path(cfg, out_dir)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        data.loader.load_state_dict(state["loader"])
        step = state["step"]
        rt.print(f"resumed from {resume_from} at step {step}")

    batches = iter(data.loader)  # from the resumed position on
    metrics = MetricsLogger(out_dir, cfg.log.tensorboard, enabled=rt.is_main)
    flops_token = flops_per_token(model.config, cfg.data.seq_len)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not rt.is_main, dynamic_ncols=True)
    loss = float("nan")

    def save(at_step: int) -> None:
        extra = {"scheduler": scheduler.state_dict(), "loader": data.loader.state_dict()}
        ckpt.save_checkpoint(out_dir / "checkpoints", at_step, model, optimizer, extra, cfg.checkpoint.keep_last)

    with _StopRequest() as stop:
        while step < total_steps:
            start = time.perf_counter()
            micro = [_to_device(next(batches), rt.device) for _ in range(accumulation)]
            result = forward_backward(model, micro, _global_count, rt.autocast_dtype, cfg.train.router_z_loss_coef,
                                      rt.world_size, rt.ranks_per_row)
            clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = float(result.loss)
            elapsed = time.perf_counter() - start
            tokens = sum(b["input_ids"].numel() for b in micro) * rt.dp_size
            tokens_per_s = tokens / elapsed
            scalars = dict(loss=loss, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                           tokens_per_s=tokens_per_s, memory_gb=rt.peak_memory_gb())
            if result.router is not None:
                scalars.update(_router_scalars(result.router, rt.world_size))
            if rt.device.type == "cuda":
                scalars["mfu"] = flops_token * tokens_per_s / (PEAK_BF16_FLOPS * rt.world_size)
            if cfg.train.eval_steps and step % cfg.train.eval_steps == 0 and data.val_batches:
                scalars["eval_loss"] = evaluate_loss(model, data.val_batches, rt)
            if step % cfg.train.log_steps == 0 or "eval_loss" in scalars:
                metrics.log(step, **scalars)
            bar.set_postfix({k: f"{v:.3g}" for k, v in scalars.items()}, refresh=False)
            bar.update(1)
            if cfg.checkpoint.export_steps and step % cfg.checkpoint.export_steps == 0:
                export_model(model, tokenizer, out_dir / f"export_step_{step:08d}", rt)
            if stop.requested or (cfg.train.save_steps and step % cfg.train.save_steps == 0):
                save(step)
            if stop.requested:
                rt.print(f"stopped by signal at step {step}; resume with --train.resume true")
                break
    bar.close()
    metrics.close()
    export_dir = None
    if not stop.requested:
        if cfg.train.save_steps == 0 or step % cfg.train.save_steps:
            save(step)
        if cfg.checkpoint.export_final:
            export_dir = out_dir / "final"
            export_model(model, tokenizer, export_dir, rt)
            rt.print(f"exported the final model to {export_dir}")
    return TrainResult(out_dir, step, loss, export_dir)


def _router_scalars(router: dict, world_size: int) -> dict:
    """MoE balance over all ranks: the router losses (mean over ranks), and the busiest and
    idlest expert of any layer as a multiple of an even share (1.0 = perfectly balanced)."""
    losses = torch.stack([router["aux_loss"], router["z_loss"]])
    summed = _global_count(torch.cat([losses, router["tokens_per_expert"].flatten()]))  # one all-reduce
    counts = summed[2:].view_as(router["tokens_per_expert"])  # [layers, E]
    share = counts / counts.mean(dim=-1, keepdim=True).clamp(min=1)
    aux, z = (summed[:2] / world_size).tolist()
    return {"moe_aux_loss": aux, "moe_z_loss": z,
            "expert_load_max": float(share.max()), "expert_load_min": float(share.min())}


def _resume_path(cfg: RunConfig, out_dir: Path) -> Path | None:
    if cfg.train.resume is False:
        return None
    if cfg.train.resume is True:
        return ckpt.latest_checkpoint(out_dir / "checkpoints")  # None: a fresh run
    path = Path(cfg.train.resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume: checkpoint {path} does not exist")
    return ckpt.latest_checkpoint(path) if not path.name.startswith("step_") else path
