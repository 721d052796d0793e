"""What a run needs before its first step: the process layout, the model, the tokenizer, the data.

Kept apart from the loop in `trainer.py` so the loop reads as the loop.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from qwen35.data.dataset import build_datasets
from qwen35.data.loader import PackedLoader
from qwen35.model import Qwen35ForCausalLM, preset
from qwen35 import ops
from qwen35.lora import LoraSettings, apply_lora, quantize_linear_layers, reset_lora_parameters, save_adapter
from qwen35.parallel.compile import apply_activation_checkpointing, compile_layers
from qwen35.parallel.context import apply_context_parallel
from qwen35.parallel.fsdp import apply_fsdp, data_parallel_mesh
from qwen35.parallel.sequence import apply_sequence_parallel, parallel_mesh
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
            raise ValueError("parallel.sp and parallel.cp cannot both be > 1 (not built yet)")
        for key, n in (("parallel.sp", sp), ("parallel.cp", cp)):
            if n < 1 or world_size % n:
                raise ValueError(f"{key} ({n}) must be >= 1 and divide the number of processes ({world_size})")
        if sp * cp > 1:
            row_group = parallel_mesh(device.type, sp * cp)["seq"].get_group()
        wants_bf16 = cfg.model.dtype == "bfloat16" or (cfg.model.dtype == "auto" and device.type == "cuda")
        if cfg.model.kernels == "fast":
            ops.use_backend("fast", strict=True)
        elif cfg.model.kernels == "auto" and device.type == "cuda":
            ops.use_backend("fast", strict=False)
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


def load_model_and_tokenizer(cfg: RunConfig, rt: Runtime):
    """The checkpoint at `model.path`, a random preset, or the built-in tiny model."""
    from transformers import AutoTokenizer

    from qwen35.train import builtin

    if cfg.optim.cpu_offload and rt.world_size > 1:
        raise ValueError("optim.cpu_offload is for one process; under FSDP use parallel.cpu_offload")

    def parallelize(model):  # adapters, then torchtitan's order: sp or cp, checkpointing, compile, FSDP
        if cfg.lora.rank:
            apply_lora(model, LoraSettings(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.use_rslora,
                                           list(cfg.lora.target_modules), list(cfg.lora.target_parameters)))
        if rt.row_group is not None:
            apply = apply_context_parallel if cfg.parallel.cp > 1 else apply_sequence_parallel
            apply(model, rt.row_group)
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model, "offload" if cfg.train.offload_activations else "full")
        if cfg.train.compile:
            compile_layers(model)
        if rt.world_size > 1:  # over every rank, sequence-parallel ones included (docs/parallel.md)
            apply_fsdp(model, data_parallel_mesh(rt.device.type), cfg.parallel.reshard_after_forward,
                       cfg.parallel.cpu_offload)

    if cfg.model.path:
        path = Path(cfg.model.path)
        qlora = cfg.lora.quantize_base == "nf4"
        if qlora and rt.world_size > 1:
            raise ValueError("lora.quantize_base nf4 (QLoRA) runs on one GPU: FSDP over 4-bit weights is not built")
        # QLoRA quantizes the loaded weights, so it parallelizes (adds adapters) after loading.
        model = Qwen35ForCausalLM.from_pretrained(path, dtype=_parameter_dtype(cfg, rt), device=rt.device,
                                                  parallelize=None if qlora else parallelize)
        if qlora:
            quantize_linear_layers(model, rt.autocast_dtype or torch.float32)
            parallelize(model)
        else:
            reset_lora_parameters(model)  # adapters are not in the checkpoint
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        # Random weights: every rank draws the same full model from the seed, then keeps its shards.
        tokenizer = builtin.tokenizer(cfg)
        config = preset(cfg.model.preset) if cfg.model.preset else builtin.model_config(tokenizer)
        model = Qwen35ForCausalLM.from_config(config, device=rt.device, dtype=_parameter_dtype(cfg, rt))
        parallelize(model)
    model.train()
    return model, tokenizer


def _parameter_dtype(cfg: RunConfig, rt: Runtime) -> torch.dtype:
    """float32 master weights, unless they are elsewhere on one device under bf16 compute: a
    frozen base (LoRA) needs none, and `optim.cpu_offload` keeps them in the optimizer. The model
    then holds bf16, which autocast would cast to anyway (the float32 parameters of DESIGN §3 stay
    float32). Under FSDP the parameters stay float32, one dtype per sharded group."""
    if (cfg.lora.rank or cfg.optim.cpu_offload) and rt.autocast_dtype is not None and rt.world_size == 1:
        return rt.autocast_dtype
    return torch.float32


def export_model(model, tokenizer, directory: Path, rt: Runtime) -> None:
    """HF format: safetensors (stored dtypes), config.json, tokenizer files and chat template;
    with LoRA, the adapter in PEFT's format instead of the weights (`qwen35 merge` folds it in).

    Every rank takes part (FSDP gathers the full tensors); rank 0 writes.
    """
    if getattr(model, "lora_settings", None) is not None:
        save_adapter(model, directory, base_model=_base_model_path(model))
    else:
        model.save_pretrained(directory)
    if rt.is_main:
        tokenizer.save_pretrained(directory)


@dataclass
class RunData:
    loader: PackedLoader  # this rank's micro-batches (its data-parallel replica's), resumable
    train_rows: int
    val_batches: list[dict]  # this rank's share of the validation rows


def prepare_data(cfg: RunConfig, tokenizer, rt: Runtime) -> RunData:
    datasets = build_datasets(cfg.data, tokenizer, progress=rt.is_main)
    rt.print(datasets.stats.summary())
    loader = PackedLoader(datasets.train, cfg.train.micro_batch_size, seed=cfg.data.seed,
                          rank=rt.dp_rank, world_size=rt.dp_size)
    val_batches = []
    if datasets.val is not None:
        val = PackedLoader(datasets.val, cfg.train.micro_batch_size, rank=rt.dp_rank, world_size=rt.dp_size,
                           shuffle=False)
        val_batches = list(itertools.islice(val, val.batches_per_epoch))
    return RunData(loader, len(datasets.train), val_batches)


def _base_model_path(model) -> str | None:
    origin = getattr(model, "origin", None)
    return str(origin.directory) if origin is not None else None
