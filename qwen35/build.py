"""Where a model is built for training: `build_model`, one fixed order, top to bottom.

    config -> model on the meta device -> quantization and adapters -> expert or sequence parallelism
    -> activation checkpointing -> compile -> FSDP2 -> memory on the device (`to_empty`)
    -> weights from the checkpoint -> whatever the checkpoint does not hold (fresh adapters, or
    a whole random preset)

Everything before `to_empty` rewrites a model that has no memory yet, so nothing is allocated
twice and, under FSDP, each rank only ever holds its shards: `load_weights` then reads just this
rank's slice of each tensor. The order is torchtitan's; each step is a free function from the
package that owns it (`qwen35.lora`, `qwen35.parallel`), and none of them knows about the others.

One exception, said where it happens: a QLoRA base quantizes real weights, so it is loaded and
quantized before its adapters are added (the routed experts expert by expert as they are read,
the linear layers once loaded). QLoRA runs on one device, so nothing is sharded then.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from qwen35.errors import UserError
from qwen35.checkpoint.hf import load_weights, read_model_config
from qwen35.lora import (LoraSettings, apply_lora, lora_parameter_names, quantize_experts, quantize_linear_layers,
                         reset_lora_parameters)
from qwen35.model import Qwen35Config, Qwen35ForCausalLM, preset
from qwen35.model.config import SIZED_FOR_TOKENIZER, Qwen35VLConfig, read_config_json
from qwen35.model.vl import Qwen35ForConditionalGeneration
from qwen35.parallel.checkpointing import apply_activation_checkpointing
from qwen35.parallel.compile import compile_layers
from qwen35.parallel.context import apply_context_parallel
from qwen35.parallel.expert import apply_expert_parallel, expert_parallel_mesh
from qwen35.parallel.fsdp import apply_fsdp, data_parallel_mesh
from qwen35.parallel.sequence import apply_sequence_parallel
from qwen35.train.config import RunConfig
from qwen35.train.setup import Runtime


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_source(cfg: RunConfig) -> None:
    if not cfg.model.path and not cfg.model.preset:
        raise UserError("no model to train: set model.path to a Hugging Face model directory, or model.preset "
                         "to a named size for random weights (tiny, 0.8B, 9B, ...)")


def load_tokenizer(cfg: RunConfig):
    """The checkpoint's tokenizer; for a random preset, the project's own small tokenizer,
    built once into the run's output directory."""
    from transformers import AutoTokenizer

    from qwen35.data.tokenizer import build_tokenizer

    check_model_source(cfg)
    if cfg.model.path:
        model_dir = Path(cfg.model.path)
        # Without these files AutoTokenizer returns a near-empty tokenizer instead of failing.
        if model_dir.is_dir() and not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"no tokenizer in {model_dir} (none of {', '.join(TOKENIZER_FILES)}); copy the "
                            "tokenizer files of the model it was saved from into it")
        return AutoTokenizer.from_pretrained(model_dir)
    directory = Path(cfg.train.output_dir) / "builtin" / "tokenizer"
    if not (directory / "tokenizer.json").is_file():
        # Built aside and renamed into place: every rank of a torchrun job builds the same files,
        # and one rank must never read another's half-written directory.
        partial = directory.with_name(f"tokenizer.partial{os.getpid()}")
        build_tokenizer(partial)
        try:
            partial.rename(directory)
        except OSError:  # another rank got there first
            shutil.rmtree(partial)
    return AutoTokenizer.from_pretrained(directory)


def model_config(cfg: RunConfig, tokenizer) -> Qwen35Config:
    """The checkpoint's config.json, or the preset; the tiny preset is sized for the tokenizer."""
    check_model_source(cfg)
    if cfg.model.path:
        if "vision_config" in read_config_json(cfg.model.path):
            return Qwen35VLConfig.from_hf_dict(read_config_json(cfg.model.path),
                                               source=str(Path(cfg.model.path) / "config.json"))
        return read_model_config(cfg.model.path)
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if cfg.model.preset in SIZED_FOR_TOKENIZER:
        config = preset(cfg.model.preset, vocab_size=len(tokenizer), **ids)
    else:
        config = preset(cfg.model.preset)  # trained with the run's tokenizer: it must fit, and stop and pad at its ids
        if len(tokenizer) > config.vocab_size:
            raise UserError(f"model.preset {cfg.model.preset}: vocab_size {config.vocab_size} is smaller than the "
                            f"tokenizer's {len(tokenizer)} entries")
        config = dataclasses.replace(config, **ids)
    if isinstance(config, Qwen35VLConfig):  # the media tokens at the tokenizer's ids
        names = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                     vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
        config = dataclasses.replace(config, **{k: tokenizer.convert_tokens_to_ids(v) for k, v in names.items()})
    return config


def parameter_dtype(cfg: RunConfig, rt: Runtime) -> torch.dtype:
    """float32 master weights, unless they are elsewhere on one device under bf16 compute: a
    frozen base (LoRA) needs none, and `optim.cpu_offload` keeps them in the optimizer. The model
    then holds bf16, which autocast would cast to anyway (the float32 parameters of DESIGN §3 stay
    float32). Under FSDP the parameters stay float32, one dtype per sharded group. `optim.weights`
    bf16_kahan or bf16 asks for bf16 weights outright."""
    if cfg.optim.weights != "float32":
        return torch.bfloat16
    if (cfg.lora.rank or cfg.optim.cpu_offload) and rt.autocast_dtype is not None and rt.world_size == 1:
        return rt.autocast_dtype
    return torch.float32


def is_vision_language(cfg: RunConfig) -> bool:
    """Whether `cfg` trains a vision-language model (a VL checkpoint, or a VL preset)."""
    check_model_source(cfg)
    if cfg.model.path:
        return "vision_config" in read_config_json(cfg.model.path)
    return cfg.model.preset.endswith("-vl")


FREEZE_PREFIXES = {  # model.freeze's parts, by parameter name
    "vision": ("model.visual.patch_embed.", "model.visual.pos_embed.", "model.visual.blocks."),
    "merger": ("model.visual.merger.",),
    "language": ("model.language_model.", "lm_head."),
}


def freeze(model: torch.nn.Module, parts: list[str]) -> None:
    """No gradient for the parameters of `parts` (adapters included: a frozen part learns nothing)."""
    if parts and not isinstance(model, Qwen35ForConditionalGeneration):
        raise UserError(f"model.freeze {list(parts)}: the model is text-only; freezing parts is for "
                        "vision-language models")
    prefixes = tuple(p for part in parts for p in FREEZE_PREFIXES[part])
    for name, parameter in model.named_parameters():
        if name.startswith(prefixes):
            parameter.requires_grad_(False)


def build_model(cfg: RunConfig, rt: Runtime, tokenizer) -> Qwen35ForCausalLM | Qwen35ForConditionalGeneration:
    """The model of `cfg` on `rt`'s device(s), ready to train."""
    qlora = cfg.lora.quantize_base == "nf4"
    if cfg.optim.cpu_offload and rt.world_size > 1:
        raise UserError("optim.cpu_offload is for one process; under FSDP use parallel.cpu_offload")
    if (cfg.optim.name != "adamw" or cfg.optim.weights != "float32") and rt.world_size > 1:
        raise UserError(f"optim.name {cfg.optim.name} with optim.weights {cfg.optim.weights} runs in one process: "
                        "under FSDP use optim.name adamw and optim.weights float32")
    if cfg.optim.in_backward and rt.world_size > 1:
        raise UserError("optim.in_backward runs in one process: FSDP reduces the gradients after the backward")
    if qlora and rt.world_size > 1:
        raise UserError("lora.quantize_base nf4 (QLoRA) runs on one GPU: FSDP over 4-bit weights is not built")
    if cfg.parallel.ep < 1:
        raise UserError(f"parallel.ep must be >= 1, got {cfg.parallel.ep}")
    if cfg.parallel.ep > 1 and rt.world_size % cfg.parallel.ep:
        raise UserError(f"parallel.ep ({cfg.parallel.ep}) must divide the number of ranks ({rt.world_size})")
    if cfg.parallel.ep > 1 and cfg.lora.target_parameters:
        raise UserError("parallel.ep with lora.target_parameters (adapters on the routed experts) is not built")

    # 1. config, 2. the model on the meta device, in the dtype it will train in
    config = model_config(cfg, tokenizer)
    vision_language = isinstance(config, Qwen35VLConfig)
    if vision_language and (qlora or cfg.parallel.ep > 1 or rt.row_group is not None):
        raise UserError("a vision-language model trains with FSDP, LoRA and full fine-tuning; QLoRA, "
                        "parallel.ep, parallel.sp and parallel.cp are not built for it")
    with torch.device("meta"):
        model = (Qwen35ForConditionalGeneration if vision_language else Qwen35ForCausalLM)(config)
    model.to_compute_dtype(parameter_dtype(cfg, rt))

    # 3. quantization and adapters
    if qlora:  # NF4 quantizes real weights: the base gets its memory and weights first
        quantize_experts(model)  # 4-bit storage of the routed experts, filled expert by expert as read
        _materialize(model, rt.device)
        load_weights(model, cfg.model.path)
        quantize_linear_layers(model, rt.autocast_dtype or torch.float32)
    if cfg.lora.rank:
        apply_lora(model, LoraSettings(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.use_rslora,
                                       list(cfg.lora.target_modules), list(cfg.lora.target_parameters)))
    freeze(model, list(cfg.model.freeze))

    # 4. expert or sequence parallelism, 5. activation checkpointing, 6. compile, 7. FSDP2
    expert_mesh = None
    if cfg.parallel.ep > 1:
        expert_mesh = expert_parallel_mesh(rt.device.type, cfg.parallel.ep)
        apply_expert_parallel(model, expert_mesh)
    if rt.row_group is not None:  # ranks that share each row: Ulysses (sp) or GDN context parallelism (cp)
        apply = apply_context_parallel if cfg.parallel.cp > 1 else apply_sequence_parallel
        apply(model, rt.row_group)
    if cfg.train.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.train.compile:
        compile_layers(model)
    if rt.world_size > 1:
        apply_fsdp(model, data_parallel_mesh(rt.device.type), cfg.parallel.reshard_after_forward,
                   cfg.parallel.cpu_offload, expert_mesh)

    # 8. memory on the device, 9. the checkpoint's weights, 10. what the checkpoint does not hold
    if not qlora:
        _materialize(model, rt.device)
        if cfg.model.path:
            load_weights(model, cfg.model.path, skip=lora_parameter_names(model))
        else:
            _init_random(model)
    reset_lora_parameters(model)
    model.train()
    return model


def build_model_and_tokenizer(cfg: RunConfig, rt: Runtime):
    tokenizer = load_tokenizer(cfg)
    return build_model(cfg, rt, tokenizer), tokenizer


def _materialize(model: Qwen35ForCausalLM, device: torch.device) -> None:
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives the tied head memory of its own


def _init_random(model: Qwen35ForCausalLM) -> None:
    """transformers' initialisation. Sharded, every rank draws the same whole model on the CPU
    from the seed and keeps its slices, so the weights do not depend on the number of ranks."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        model.init_weights()
        return
    kind = Qwen35ForConditionalGeneration if isinstance(model, Qwen35ForConditionalGeneration) else Qwen35ForCausalLM
    whole = kind.from_config(model.config)
    set_model_state_dict(model, whole.state_dict(), options=StateDictOptions(full_state_dict=True))
