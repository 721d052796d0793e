"""What a run needs besides its model (built in `qwen35.build`): the process layout, the data,
and the export of the result.

Kept apart from the loop in `trainer.py` so the loop reads as the loop.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from qwen35.errors import UserError
from qwen35.data.dataset import build_datasets
from qwen35.data.loader import PackedLoader
from qwen35.data.media import collate_media
from qwen35.data.media_pack import build_media_datasets
from qwen35.data.pack import collate
from qwen35.data.processor import load_image_processor, load_video_processor, save_processor
from qwen35 import ops
from qwen35.lora import save_adapter
from qwen35.parallel.sequence import parallel_mesh
from qwen35.train.config import RunConfig


@dataclass
class Runtime:
    """Where this process runs: device, rank, the process layout, and the compute precision.

    Ranks form a dp x seq grid (`qwen35.parallel.sequence.parallel_mesh`): the `ranks_per_row`
    consecutive ranks of a data-parallel replica (parallel.sp or parallel.cp) read the same rows,
    each keeping a slice of them; `dp_rank` picks the rows.

    Parameters, gradients and optimizer state stay float32 (the master weights); on a GPU the
    forward and backward run in bf16 under autocast (`model.dtype` auto or bfloat16), on a CPU in
    float32.
    """

    device: torch.device
    rank: int
    world_size: int
    autocast_dtype: torch.dtype | None
    row_group: dist.ProcessGroup | None = None  # the ranks sharing this rank's rows, if several
    ranks_per_row: int = 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ranks_per_row

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ranks_per_row

    @classmethod
    def start(cls, cfg: RunConfig) -> Runtime:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)
        sp, cp, row_group = cfg.parallel.sp, cfg.parallel.cp, None
        if sp > 1 and cp > 1:
            raise UserError(f"parallel.sp ({sp}) and parallel.cp ({cp}) together are not built: set one of them to 1. "
                            "parallel.cp has no head-count limit and its exchange does not grow with the row, so "
                            "it is the one for rows longer than parallel.sp's head counts allow")
        for key, n in (("parallel.sp", sp), ("parallel.cp", cp)):
            if n < 1 or world_size % n:
                raise UserError(f"{key} ({n}) must be >= 1 and divide the number of processes ({world_size})")
        if sp * cp > 1:
            row_group = parallel_mesh(device.type, sp * cp)["seq"].get_group()
        wants_bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and device.type == "cuda")
        if cfg.model.kernels == "fast":
            ops.use_backend("fast", strict=True, delta_rule_kernel=cfg.model.delta_rule_kernel)
        elif cfg.model.kernels == "auto" and device.type == "cuda":
            ops.use_backend("fast", strict=False, delta_rule_kernel=cfg.model.delta_rule_kernel)
        return cls(device, rank, world_size, torch.bfloat16 if wants_bf16 else None, row_group, sp * cp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def export_model(model, tokenizer, directory: Path, rt: Runtime, image_processor=None,
                 model_path: str | None = None, video_processor=None) -> None:
    """HF format: safetensors (stored dtypes), config.json, tokenizer files and chat template,
    and for a vision-language model its processor files; with LoRA, the adapter in PEFT's format
    instead of the weights (`qwen35 merge` folds it in).

    Every rank takes part (FSDP gathers the full tensors); rank 0 writes.
    """
    if getattr(model, "lora_settings", None) is not None:
        save_adapter(model, directory, base_model=_base_model_path(model))
    else:
        model.save_pretrained(directory)
    if rt.is_main:
        tokenizer.save_pretrained(directory)
        if image_processor is not None:
            save_processor(image_processor, tokenizer, directory, model_path, video_processor)


def use_run_chat_template(cfg: RunConfig, tokenizer) -> None:
    """`data.chat_template` replaces the tokenizer's template: exports must render prompts as
    training did."""
    if cfg.data.chat_template is not None:
        tokenizer.chat_template = Path(cfg.data.chat_template).read_text(encoding="utf-8")


@dataclass
class RunData:
    loader: PackedLoader  # this rank's micro-batches (its data-parallel replica's), resumable
    train_rows: int
    val_batches: list[dict]  # this rank's share of the validation rows
    image_processor: object | None = None  # vision-language runs: transformers' image processor
    video_processor: object | None = None  # and its video processor (None: the model directory has none)


def prepare_data(cfg: RunConfig, tokenizer, rt: Runtime, vision_language: bool = False) -> RunData:
    """The packed rows of `cfg.data`; image-text rows (`qwen35.data.media`) for a vision-language
    model, which also reads text-only records."""
    data_cfg = cfg.data
    if data_cfg.cache_dir is None:  # the stores live with the run: a resumed run maps them at once
        data_cfg = replace(data_cfg, cache_dir=str(Path(cfg.train.output_dir) / "data_cache"))
    image_processor, video_processor, collate_fn, workers = None, None, collate, 0
    if vision_language:
        image_processor, video_processor = run_image_processor(cfg), run_video_processor(cfg)
        datasets = build_media_datasets(data_cfg, tokenizer, image_processor, video_processor)
        collate_fn, workers = collate_media, data_cfg.num_workers  # media are decoded in the workers
    else:
        datasets = build_datasets(data_cfg, tokenizer, progress=rt.is_main)
    use_run_chat_template(cfg, tokenizer)
    rt.print(datasets.stats.summary())
    loader = PackedLoader(datasets.train, cfg.train.micro_batch_size, seed=cfg.data.seed,
                          rank=rt.dp_rank, world_size=rt.dp_size, collate_fn=collate_fn, num_workers=workers)
    val_batches = []
    if datasets.val is not None:
        val = PackedLoader(datasets.val, cfg.train.micro_batch_size, rank=rt.dp_rank, world_size=rt.dp_size,
                           shuffle=False, collate_fn=collate_fn)
        val_batches = list(itertools.islice(val, val.batches_per_epoch))
    return RunData(loader, len(datasets.train), val_batches, image_processor, video_processor)


def run_image_processor(cfg: RunConfig):
    """transformers' image processor of a vision-language run: the model directory's (or
    Qwen3.5's settings for a preset) with the run's pixel budget. The trainer reads its images
    with it and its exports carry it, `qwen35 export` included."""
    return load_image_processor(cfg.model.path, cfg.data.image_min_pixels, cfg.data.image_max_pixels)


def run_video_processor(cfg: RunConfig):
    """transformers' video processor of a vision-language run, as `run_image_processor`, with the
    run's frame rate, frame cap and pixel budget (None for a model directory without one)."""
    d = cfg.data
    return load_video_processor(cfg.model.path, d.video_fps, d.video_max_frames, d.video_min_pixels, d.video_max_pixels)


def _base_model_path(model) -> str | None:
    origin = getattr(model, "origin", None)
    return str(origin.directory.resolve()) if origin is not None else None  # loads from any directory
