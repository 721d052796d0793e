"""The run config: what to train, on what data, for how long, and how.

One flat dataclass per section (model, data, train, optim, lora, checkpoint, log, parallel),
gathered in `RunConfig`, and the rules that span fields. Every key has a type, a default and a
one-line help string, kept next to each other in the dataclass so that the help text cannot drift
from what the trainer reads. Reading a YAML file and dotted flags into a `RunConfig`, and the help
text, are in `config_parser.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def option(default: Any, help: str, *, path: bool = False) -> Any:
    """A config field with its help line; `path=True` expands `~` in its value when loaded.

    Expanding here rather than in every reader matters because `--model.path=~/Qwen3.5-9B` reaches
    us unexpanded (the shell only expands `~` at the start of a word).
    """
    metadata = {"help": help, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """The model to train."""

    path: str | None = option(
        None, "Local Hugging Face model directory (config.json, safetensors, tokenizer); "
        "one of path and preset is required", path=True)
    preset: str | None = option(
        None, "Random-initialised model of a named size (qwen35.model.PRESETS: tiny, tiny-moe, 0.8B, 9B, "
        "35B-A3B, ...) instead of a checkpoint, with the project's own small tokenizer; exclusive with path")
    kernels: Literal["auto", "reference", "fast"] = option(
        "auto", "Token-mixer kernels: fast (GPU: flash-linear-attention, varlen flash attention, "
        "fused cross-entropy; refuses to start if they cannot run correctly), reference (torch), "
        "auto (fast on a GPU where it can run, else the reference, with a warning)")
    delta_rule_kernel: Literal["fla", "flash_qla"] = option(
        "fla", "Gated-delta-rule kernel of the fast path: fla (flash-linear-attention's Triton "
        "kernels) or flash_qla (QwenLM's FlashQLA, TileLang, SM90+; pip install flash-qla). "
        "With kernels: auto an unusable FlashQLA falls back to fla with a warning")
    freeze: list[str] = option(
        [], "Vision-language: parts that do not train, any of vision (the tower's blocks and "
        "embeddings), merger, language (the language model and head)")
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "Compute dtype (parameters and optimizer state stay float32 unless optim.weights says "
        "otherwise); auto: bfloat16 on GPU, float32 on CPU")


@dataclass
class DataConfig:
    """Where the training text comes from and how it is cut into packed rows."""

    train_path: str | list[str | dict[str, Any]] | None = option(
        None, "Training data: a file (jsonl, json, parquet), a directory, a glob, comma-separated "
        "entries with optional :weight, or (YAML) a list of paths or {path, weight} mappings; "
        "null: the built-in generated task", path=True)
    val_path: str | list[str] | None = option(
        None, "Validation data, as train_path without weights; exclusive with val_fraction",
        path=True)
    val_fraction: float = option(
        0.0, "Fraction of the training samples held out for validation when val_path is unset")
    seq_len: int = option(2048, "Tokens per packed row")
    overlong: Literal["drop", "truncate"] = option(
        "drop", "A sample longer than seq_len: drop it (counted per source), or truncate it to its "
        "first seq_len tokens (dropped if no answer token is left)")
    on_malformed: Literal["skip", "error"] = option(
        "skip", "What to do with a data line that cannot be parsed or templated: skip it (reported "
        "with its file and line) or stop")
    max_malformed_fraction: float = option(
        0.5, "A data file with a larger share of malformed records is an error (wrong file or format)")
    num_workers: int = option(0, "Worker processes for tokenisation; 0: in the main process")
    cache_dir: str | None = option(
        None, "Directory for the tokenised data stores (memory-mapped, built once, shared by all "
        "ranks and by later runs); null: train.output_dir/data_cache", path=True)
    chat_template: str | None = option(
        None, "A Jinja chat template file to render the data with instead of the tokenizer's own "
        "(exports carry it)", path=True)
    template_kwargs: dict[str, Any] = option(
        {}, "Extra chat-template variables, e.g. {enable_thinking: false}")
    seed: int = option(42, "Seed for shuffling and the validation split")
    media_root: str | None = option(
        None, "Vision-language data: the directory image and video paths are relative to; null: each "
        "data file's own directory", path=True)
    image_min_pixels: int | None = option(
        None, "Vision-language: the image processor's lower pixel budget (an image is resized up "
        "to at least this many pixels); null: the model directory's preprocessor_config.json")
    image_max_pixels: int | None = option(
        None, "Vision-language: the image processor's upper pixel budget; null: the model "
        "directory's preprocessor_config.json")
    video_fps: float | None = option(
        None, "Vision-language: frames kept per second of video; null: the model directory's "
        "video_preprocessor_config.json (Qwen3.5: 2)")
    video_max_frames: int | None = option(
        None, "Vision-language: at most this many frames of a video; null: the video processor's "
        "max_frames (Qwen3.5: 768)")
    video_min_pixels: int | None = option(
        None, "Vision-language: the video processor's lower pixel budget over all kept frames of a "
        "clip; null: video_preprocessor_config.json")
    video_max_pixels: int | None = option(
        None, "Vision-language: the video processor's upper pixel budget over all kept frames of a "
        "clip; null: video_preprocessor_config.json")


@dataclass
class TrainConfig:
    """The length and shape of the run, and where it writes."""

    max_steps: int | None = option(
        None, "Optimizer steps to run; overrides num_epochs when set (the data repeats as needed)")
    num_epochs: int | None = option(1, "Passes over the training data when max_steps is unset")
    global_batch_size: int = option(
        8, "Packed rows per optimizer step, summed over all data-parallel ranks")
    micro_batch_size: int = option(1, "Packed rows per forward pass on each rank")
    output_dir: str = option("outputs/run", "Directory for checkpoints, exports and logs",
                             path=True)
    save_steps: int = option(500, "Save a resumable checkpoint every N steps; 0: only at the end")
    resume: bool | str = option(
        False, "false: a fresh run (refused if output_dir holds another run); true: continue from "
        "output_dir's latest checkpoint (an error if there is none); auto: continue if there is one, "
        "else start fresh; a path: an output directory or one checkpoint (step_NNNNNNNN) to start from",
        path=True)
    overwrite_output_dir: bool = option(
        False, "Let a fresh run take over an output_dir that holds another run: its checkpoints, "
        "exports, metrics and run.json are deleted first")
    max_nonfinite_steps: int = option(
        5, "Each step with a non-finite loss or gradient norm is skipped (no update); this many in "
        "a row stop the run with an error; 0: never stop")
    eval_steps: int = option(0, "Evaluate on the validation data every N steps; 0: never")
    log_steps: int = option(1, "Log metrics every N steps")
    seed: int = option(42, "Seed for weight initialisation and dropout")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this; 0: no clipping")
    compile: bool = option(False, "torch.compile each decoder layer (fuses the elementwise work)")
    activation_checkpointing: Literal["none", "selective", "full", "offload"] = option(
        "none", "Recompute activations in the backward pass to save memory: selective (keep the "
        "matmul and attention outputs, rerun the elementwise work), full (keep each block's input "
        "only), offload (full with those inputs in pinned CPU memory and the MLP and delta rule in "
        "64k-token slices: for the longest contexts)")
    router_z_loss_coef: float = option(
        0.0, "MoE: weight of the router z-loss (mean logsumexp(logits)^2) added to the loss; 0: off")
    router_balance: Literal["micro_batch", "global"] = option(
        "micro_batch", "MoE: the load-balancing and z losses per micro-batch of each rank (transformers' "
        "form), or over the whole optimizer step, all micro-batches and ranks (global: one extra forward "
        "without gradient per micro-batch to count the step's expert assignments first)")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = option(2e-5, "Peak learning rate")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of lr (cosine, linear)")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    scheduler: Literal["cosine", "linear", "constant"] = option(
        "cosine", "Learning-rate decay after warmup")
    warmup_steps: int = option(0, "Steps of linear warmup from 0 to lr")
    name: Literal["adamw", "adamw8bit"] = option(
        "adamw", "adamw, or adamw8bit: the moments in 8-bit blocks (bitsandbytes), 2 bytes per weight "
                 "instead of 8; one process")
    weights: Literal["float32", "bf16_kahan", "bf16"] = option(
        "float32", "How trained weights are held: float32 masters (bf16 compute under autocast on GPU), "
                   "bf16_kahan (bf16 weights and gradients; each update's rounding error kept in a bf16 "
                   "compensation buffer: tracks float32 masters), bf16 (rounded at every step: updates "
                   "below half a bf16 spacing are lost); one process, full fine-tuning")
    cpu_offload: bool = option(
        False, "One process: float32 master weights and AdamW state in CPU memory, bf16 weights and "
               "gradients on the GPU (9B on one 80 GB GPU); with optim.in_backward the CPU update runs "
               "during the backward; several processes: see parallel.cpu_offload")
    in_backward: bool = option(
        False, "float32 AdamW applied to each weight inside the backward pass as soon as its gradient is "
               "complete, the gradient freed there: 12 bytes per weight instead of 16 (the 9B with float32 "
               "masters on one 141 GB GPU); with optim.cpu_offload, handed to the CPU update then. One "
               "process, one micro-batch per step, train.grad_clip 0 (the global norm is known only after "
               "every weight changed)")


@dataclass
class LoraConfig:
    """Low-rank adapters on linear layers (PEFT format); rank 0 trains every weight instead."""

    rank: int = option(0, "Adapter rank; 0: full fine-tuning")
    alpha: float = option(32.0, "Adapter scale numerator: alpha / rank (alpha / sqrt(rank) with use_rslora)")
    dropout: float = option(0.0, "Dropout on the adapter input")
    use_rslora: bool = option(False, "Rank-stabilised scaling alpha / sqrt(rank)")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
         "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj"],
        "Linear layers (by name suffix) that get an adapter")
    target_parameters: list[str] = option(
        [], "3-D parameters (by name suffix) that get an adapter: the routed experts, "
            "mlp.experts.gate_up_proj and mlp.experts.down_proj (PEFT's target_parameters)")
    quantize_base: Literal["none", "nf4"] = option(
        "none", "QLoRA: hold the frozen linear layers of the decoder in 4-bit NF4 (bitsandbytes, CUDA)")


@dataclass
class CheckpointConfig:
    """What is kept on disk."""

    keep_last: int = option(2, "Resumable checkpoints to keep; 0: keep all")
    export_final: bool = option(
        True, "Export the final weights in Hugging Face format (transformers, vLLM, SGLang)")
    export_steps: int = option(0, "Also export in Hugging Face format every N steps; 0: never")


@dataclass
class LogConfig:
    """Where metrics go besides metrics.jsonl."""

    tensorboard: bool = option(True, "Mirror metrics to TensorBoard under output_dir/tensorboard")
    wandb: bool = option(False, "Mirror metrics to Weights & Biases (pip install wandb; WANDB_MODE=offline "
                         "keeps the run under output_dir/wandb for a later `wandb sync`)")
    wandb_project: str = option("qwen35", "Weights & Biases project")
    wandb_run_name: str | None = option(None, "Weights & Biases run name (null: the output directory's name)")
    progress_seconds: float = option(
        30.0, "When output is not a terminal (torchrun logs, CI, nohup): seconds between progress lines")


@dataclass
class ParallelConfig:
    """How the model is spread over GPUs (world size comes from torchrun)."""

    reshard_after_forward: bool = option(
        True, "FSDP: free gathered weights after each forward (ZeRO-3); false keeps them (ZeRO-2)")
    cpu_offload: bool = option(
        False, "FSDP: keep parameters, gradients and optimizer state in CPU memory")
    ep: int = option(
        1, "MoE expert parallelism: each group of ep ranks splits every layer's routed experts (E/ep per "
        "rank) and exchanges tokens by all-to-all; must divide the ranks and the experts; 1: off")
    sp: int = option(
        1, "Ulysses sequence parallelism: ranks that share each row, each holding 1/sp of its tokens "
           "(divides the process count and every head count); data-parallel replicas = processes / sp")
    cp: int = option(
        1, "context parallelism: ranks that share each row, each holding 1/cp of its tokens; GDN layers "
           "pass recurrent states between ranks, attention layers gather keys and values (no head-count "
           "limit; exclusive with sp)")


@dataclass
class RunConfig:
    """One run: the sections above, each a flat dataclass."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (tuples as lists) that `yaml.safe_dump` and JSON accept."""
        return {
            name: {k: list(v) if isinstance(v, tuple) else v
                   for k, v in dataclasses.asdict(getattr(self, name)).items()}
            for name in SECTIONS
        }

    def save_yaml(self, path: str | Path) -> None:
        """Write the resolved config, so that a run can be repeated from its output dir."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# Section name → its dataclass, in the order the sections appear in help and dumped YAML.
SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}


FREEZABLE = ("vision", "merger", "language")  # model.freeze's parts (qwen35.build.freeze)


def _check(cfg: RunConfig) -> None:
    """Rules that span fields or sections; checked once YAML and flags have been merged."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"run config: {message}")

    train = cfg.train
    need(cfg.model.path != "", "model.path is empty: set it to a Hugging Face model directory, or leave it "
         "unset and set model.preset")
    need(cfg.model.path is None or cfg.model.preset is None,
         "model.path and model.preset are exclusive: load a checkpoint or build a preset")
    need(train.max_steps is not None or train.num_epochs is not None,
         "set train.max_steps or train.num_epochs")
    for key in ("train.max_steps", "train.num_epochs"):
        value = _get(cfg, key)
        need(value is None or value > 0, f"{key} must be > 0, got {value}")
    for key in ("train.micro_batch_size", "train.log_steps", "data.seq_len", "optim.lr",
                ):
        need(_get(cfg, key) > 0, f"{key} must be > 0, got {_get(cfg, key)}")
    for key in ("train.save_steps", "train.eval_steps", "train.grad_clip", "optim.warmup_steps",
                "data.num_workers", "checkpoint.keep_last", "checkpoint.export_steps", "lora.rank",
                "train.max_nonfinite_steps"):
        need(_get(cfg, key) >= 0, f"{key} must be >= 0, got {_get(cfg, key)}")
    need(train.global_batch_size > 0 and train.global_batch_size % train.micro_batch_size == 0,
         f"train.global_batch_size ({train.global_batch_size}) must be a positive multiple of "
         f"train.micro_batch_size ({train.micro_batch_size})")
    need(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
    need(cfg.data.val_path is None or cfg.data.val_fraction == 0.0,
         "data.val_path and data.val_fraction are exclusive: give a file or hold out a fraction")
    need(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout must be in [0, 1)")
    need(cfg.lora.rank == 0 or bool(cfg.lora.target_modules or cfg.lora.target_parameters),
         "lora.rank > 0 needs lora.target_modules or lora.target_parameters")
    need(cfg.lora.quantize_base == "none" or cfg.lora.rank > 0, "lora.quantize_base needs lora.rank > 0 (QLoRA)")
    need(cfg.lora.rank == 0 or cfg.model.path is not None,
         "lora.rank > 0 needs model.path: adapters fine-tune a checkpoint")
    need(not cfg.optim.cpu_offload or (cfg.optim.name, cfg.optim.weights) == ("adamw", "float32"),
         "optim.cpu_offload keeps float32 masters and AdamW state on the CPU: it takes optim.name adamw "
         "and optim.weights float32")
    need(not cfg.optim.in_backward or (cfg.optim.name, cfg.optim.weights) == ("adamw", "float32"),
         "optim.in_backward is float32 AdamW: it takes optim.name adamw and optim.weights float32")
    need(not cfg.optim.in_backward or train.grad_clip == 0,
         f"optim.in_backward updates each weight before the global gradient norm is known, so it cannot clip: "
         f"set train.grad_clip 0 (it is {train.grad_clip})")
    need(not cfg.optim.in_backward or train.global_batch_size == train.micro_batch_size,
         f"optim.in_backward updates the weights in every backward, so a step is one micro-batch: set "
         f"train.global_batch_size to train.micro_batch_size ({train.global_batch_size} vs {train.micro_batch_size})")
    need(cfg.lora.rank == 0 or cfg.optim.weights == "float32",
         "optim.weights bf16_kahan or bf16 is for full fine-tuning (lora.rank 0): adapters train in float32")
    unknown = [part for part in cfg.model.freeze if part not in FREEZABLE]
    need(not unknown, f"model.freeze: unknown part(s) {unknown}; the parts are {', '.join(FREEZABLE)}")
    need(0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
    need(all(0.0 <= b < 1.0 for b in cfg.optim.betas), "optim.betas must be in [0, 1)")


def _get(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)
