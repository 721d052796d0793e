"""The run config: what to train, on what data, for how long, and how.

One flat dataclass per section (model, data, train, optim, lora, checkpoint, log, parallel),
gathered in `RunConfig`. A run is described by a YAML file with those sections, then adjusted by
dotted command-line flags, the habit VeOmni, Axolotl and torchtitan users bring:

    qwen35 train configs/text/sft.yaml --model.path ~/Qwen3.5-9B --train.max_steps=20

Every key has a type, a default and a one-line help string, kept next to each other in the
dataclass so that `format_help()` cannot drift from what the trainer reads. Values are checked
against the field's type when they are read, so a typo fails before a model is loaded: an unknown
key names the closest known one, a bad value names the key and the type it expects.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
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
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """The model to train."""

    path: str | None = option(
        None, "Local Hugging Face model directory (config.json, safetensors, tokenizer); "
        "null: the built-in tiny model", path=True)
    preset: str | None = option(
        None, "Random-initialised model of a named size (qwen35.model.PRESETS: 0.8B, 9B, ...) "
        "instead of a checkpoint; exclusive with path")
    kernels: Literal["auto", "reference", "fast"] = option(
        "auto", "Token-mixer kernels: fast (GPU: flash-linear-attention, varlen flash attention, "
        "fused cross-entropy; refuses to start if they cannot run correctly), reference (torch), "
        "auto (fast on a GPU where it can run, else the reference, with a warning)")
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "Compute dtype (parameters and optimizer state stay float32); "
        "auto: bfloat16 on GPU, float32 on CPU")


@dataclass
class DataConfig:
    """Where the training text comes from and how it is cut into packed rows."""

    train_path: str | None = option(
        None, "Training data file (jsonl or parquet); null: the built-in generated task",
        path=True)
    val_path: str | None = option(None, "Validation data file; exclusive with val_fraction",
                                  path=True)
    val_fraction: float = option(
        0.0, "Fraction of the training samples held out for validation when val_path is unset")
    seq_len: int = option(2048, "Tokens per packed row")
    overlong: Literal["truncate", "drop"] = option(
        "truncate", "What to do with a sample longer than seq_len")
    on_malformed: Literal["skip", "error"] = option(
        "skip", "What to do with a data line that cannot be parsed or templated: skip it (reported "
        "with its file and line) or stop")
    num_workers: int = option(0, "Worker processes for tokenisation; 0: in the main process")
    cache_dir: str | None = option(
        None, "Directory for the tokenised data cache; null: no cache", path=True)
    seed: int = option(42, "Seed for shuffling and the validation split")


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
        False, "true: resume from the latest checkpoint in output_dir; a path: from that "
        "checkpoint", path=True)
    eval_steps: int = option(0, "Evaluate on the validation data every N steps; 0: never")
    log_steps: int = option(1, "Log metrics every N steps")
    seed: int = option(42, "Seed for weight initialisation and dropout")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this; 0: no clipping")
    compile: bool = option(False, "torch.compile each decoder layer (fuses the elementwise work)")
    activation_checkpointing: bool = option(
        False, "Recompute each block's activations in the backward pass to save memory")
    offload_activations: bool = option(
        False, "With activation_checkpointing, for the longest contexts: each block's input in pinned CPU "
        "memory, the MLP and the delta rule run in 64k-token slices")
    router_z_loss_coef: float = option(
        0.0, "MoE: weight of the router z-loss (mean logsumexp(logits)^2) added to the loss; 0: off")


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
    cpu_offload: bool = option(
        False, "One process: float32 master weights and AdamW state in CPU memory, bf16 weights and "
               "gradients on the GPU (9B on one 80 GB GPU); several: see parallel.cpu_offload")


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


@dataclass
class ParallelConfig:
    """How the model is spread over GPUs (world size comes from torchrun)."""

    reshard_after_forward: bool = option(
        True, "FSDP: free gathered weights after each forward (ZeRO-3); false keeps them (ZeRO-2)")
    cpu_offload: bool = option(
        False, "FSDP: keep parameters, gradients and optimizer state in CPU memory")
    sp: int = option(
        1, "Ulysses sequence parallelism: ranks that share each row, each holding 1/sp of its tokens "
           "(divides the process count and every head count); data-parallel replicas = processes / sp")
    cp: int = option(
        1, "context parallelism: ranks that share each row, each holding 1/cp of its tokens; GDN layers "
           "pass recurrent states between ranks, attention layers take sp's all-to-all (exclusive with sp)")


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


def _check(cfg: RunConfig) -> None:
    """Rules that span fields or sections; checked once YAML and flags have been merged."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"run config: {message}")

    train = cfg.train
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
                "data.num_workers", "checkpoint.keep_last", "checkpoint.export_steps", "lora.rank"):
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
    need(not cfg.train.offload_activations or cfg.train.activation_checkpointing,
         "train.offload_activations needs train.activation_checkpointing")
    need(cfg.lora.quantize_base == "none" or cfg.lora.rank > 0, "lora.quantize_base needs lora.rank > 0 (QLoRA)")
    need(cfg.lora.rank == 0 or cfg.model.path is not None,
         "lora.rank > 0 needs model.path: adapters fine-tune a checkpoint")
    need(0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
    need(all(0.0 <= b < 1.0 for b in cfg.optim.betas), "optim.betas must be in [0, 1)")


def _get(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


# --- loading --------------------------------------------------------------------------------


def load_run_config(yaml_path: str | Path | None, overrides: list[str]) -> RunConfig:
    """Defaults, then the YAML file's values, then the command-line overrides, last one winning.

    `overrides` are the arguments after the YAML path: `--train.max_steps 20`,
    `--train.max_steps=20`, or a bare `--train.activation_checkpointing` for true.
    """
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if yaml_path is not None:
        _merge_yaml(values, Path(yaml_path))
    for key, raw in _split_overrides(overrides):
        section, name = _resolve_key(key, "command line")
        values[section][name] = _coerce(raw, section, name, "command line")
    return RunConfig(**{s: cls(**values[s]) for s, cls in SECTIONS.items()})


def _merge_yaml(values: dict[str, dict[str, Any]], path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if doc is None:
        return
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, entries in doc.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), list(SECTIONS), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"sections are: {', '.join(SECTIONS)}"
            raise ValueError(f"{path}: unknown section {section!r}; {hint}")
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping of keys to values")
        for name, value in entries.items():
            section_, name_ = _resolve_key(f"{section}.{name}", str(path))
            values[section_][name_] = _coerce(value, section_, name_, str(path))


def _split_overrides(args: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"command line: unexpected argument {arg!r}; overrides look like "
                             "--section.key value or --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if eq:
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        elif _takes_bool(_field_type(*_resolve_key(key, "command line"))):
            value = "true"
            i += 1
        else:
            raise ValueError(f"command line: --{key} needs a value")
        pairs.append((key, value))
    return pairs


def _takes_bool(tp: Any) -> bool:
    return tp is bool or bool in typing.get_args(tp)


def _resolve_key(key: str, source: str) -> tuple[str, str]:
    """`section.name` → (section, name), or a ValueError naming the closest known key."""
    section, _, name = key.partition(".")
    if section in SECTIONS and name in _names(SECTIONS[section]):
        return section, name
    all_keys = [f"{s}.{n}" for s, cls in SECTIONS.items() for n in _names(cls)]
    # A right key in the wrong section (train.lr) is a likelier slip than a misspelling.
    elsewhere = [k for k in all_keys if k.endswith(f".{name}")]
    if section in SECTIONS:  # compare names only: a shared "train." prefix says nothing
        close = difflib.get_close_matches(name, _names(SECTIONS[section]), n=1, cutoff=0.6)
        close = [f"{section}.{n}" for n in close]
    else:
        close = difflib.get_close_matches(key, all_keys, n=1, cutoff=0.6)
    guess = elsewhere or close
    if guess:
        hint = f"did you mean {' or '.join(guess)}?"
    elif section in SECTIONS:
        hint = f"{section} has: {', '.join(_names(SECTIONS[section]))}"
    else:
        hint = f"sections are: {', '.join(SECTIONS)}"
    raise ValueError(f"{source}: unknown key {key!r}; {hint}")


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _field_type(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[name]


def _coerce(value: Any, section: str, name: str, source: str) -> Any:
    """Check a YAML value or parse a command-line string into the field's type."""
    tp = _field_type(section, name)
    try:
        value = _to_type(value, tp)
    except (TypeError, ValueError):
        expected = _type_name(tp)
        raise ValueError(f"{source}: {section}.{name} = {value!r}: expected {expected}") from None
    is_path = SECTIONS[section].__dataclass_fields__[name].metadata["path"]
    return os.path.expanduser(value) if is_path and isinstance(value, str) else value


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~"}


def _to_type(value: Any, tp: Any) -> Any:
    """Raise TypeError/ValueError if `value` (a YAML value or a flag's string) is not a `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    is_str = isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (is_str and value.lower() in _NULL)):
            return None
        for member in (a for a in args if a is not type(None)):
            try:
                return _to_type(value, member)
            except (TypeError, ValueError):
                pass
        raise ValueError(value)
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(value)
    if origin in (tuple, list):
        if is_str:  # a flag: YAML flow syntax, e.g. [0.9, 0.95]
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        if origin is list:
            return [_to_type(v, args[0]) for v in value]
        if len(value) != len(args):
            raise ValueError(value)
        return tuple(_to_type(v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if is_str and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(value)
        return int(value)
    if tp is float:
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept it as the number it plainly is.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(value)
        return float(value)
    if tp is str:
        if is_str:
            return value
        raise TypeError(value)
    raise AssertionError(f"unsupported config field type {tp}")


# --- help -----------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if tp is type(None) else tp.__name__


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if value is None:  # spelled as in the YAML file
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_help() -> str:
    """Every key with its type, default and help line, grouped by section."""
    lines = ["Run config keys (set in the YAML file or override with --section.key VALUE):"]
    for section, cls in SECTIONS.items():
        lines += ["", f"{section}: {cls.__doc__.strip()}"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"  --{section}.{f.name}  ({_type_name(hints[f.name])}, "
                         f"default: {_default_text(f)})")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines) + "\n"
