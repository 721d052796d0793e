"""Hugging Face checkpoints in and out: config.json + safetensors (sharded, with an index).

Our parameter names are transformers' text-model names, so loading is the identity up to the
prefix: the vision-language checkpoints (`Qwen3_5ForConditionalGeneration`, the official ones)
put the text model under `model.language_model.*` beside `model.visual.*`, and also carry
`mtp.*` (multi-token prediction) weights. We train the text model; the other tensors are carried
through untouched (read again from the source files on save, never held in memory), so an
export is the same model type that transformers and vLLM served before.

Every tensor keeps the dtype it was stored in: official checkpoints store `A_log` and the GDN
norm weight in float32 and the rest in bf16; we export each tensor in its stored dtype.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from qwen35.errors import UserError
from qwen35.model.config import Qwen35Config, read_config_json
from qwen35.parallel import is_rank_zero

VL_TEXT_PREFIX = "model.language_model."
CARRIED_PREFIXES = ("model.visual.", "mtp.")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class CheckpointOrigin:
    """What a loaded model remembers of its checkpoint, for a faithful export."""

    directory: Path
    raw_config: dict
    vision_language: bool
    stored_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # by our parameter name
    carried: dict[str, str] = field(default_factory=dict)  # carried key -> file name


class CheckpointError(UserError):
    pass


def weight_files(model_dir: Path) -> dict[str, str]:
    """Checkpoint key -> safetensors file name, from the index or the single file."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    single = model_dir / SINGLE_NAME
    if not single.is_file():
        raise CheckpointError(f"{model_dir} has no {SINGLE_NAME} or {INDEX_NAME}")
    with _open(single) as f:
        return {key: SINGLE_NAME for key in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e}); is it truncated?") from None


_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _text_parameter_name(checkpoint_key: str, vision_language: bool) -> str | None:
    """The text model's name for a checkpoint key; None for a tensor carried through."""
    if checkpoint_key.startswith(CARRIED_PREFIXES):
        return None
    if vision_language and checkpoint_key.startswith(VL_TEXT_PREFIX):
        return "model." + checkpoint_key[len(VL_TEXT_PREFIX):]
    return checkpoint_key


def _model_piece(checkpoint_key: str, vision_language: bool, config: Qwen35Config, parameter_name=None):
    """(our parameter name, where the stored tensor sits in it), or None for a carried tensor.

    `parameter_name(key)`, a model class's own key map (the vision-language model's), replaces
    the text model's.

    Most tensors are a whole parameter (index `()`). MoE checkpoints store each routed expert's
    projections apart (some writers store the fused 3-D tensors, which load as they are); in memory they are fused per layer: `experts.{e}.gate_proj` is
    `experts.gate_up_proj[e, :I]`, `up_proj` is `[e, I:]`, `down_proj` is `experts.down_proj[e]`.
    """
    if parameter_name is not None:
        name = parameter_name(checkpoint_key)
    else:
        name = _text_parameter_name(checkpoint_key, vision_language)
    if name is None:
        return None
    expert = _EXPERT_KEY.match(name)
    if expert is None:
        return name, ()
    prefix, e, part = expert.group(1), int(expert.group(2)), expert.group(3)
    inner = config.moe_intermediate_size
    if part == "down_proj":
        return f"{prefix}.down_proj", (e,)
    rows = slice(0, inner) if part == "gate_proj" else slice(inner, 2 * inner)
    return f"{prefix}.gate_up_proj", (e, rows)


def _complete(pieces: list, needed: int) -> bool:
    """All of a parameter is stored: as one tensor, or as all its per-expert pieces."""
    return len(pieces) == needed or (len(pieces) == 1 and pieces[0][2] == ())


def _pieces_per_parameter(name: str, config: Qwen35Config) -> int:
    if name.endswith(".experts.gate_up_proj"):
        return 2 * config.num_experts
    return config.num_experts if name.endswith(".experts.down_proj") else 1


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def read_model_config(model_dir) -> Qwen35Config:
    """The text model's arguments from a model directory's config.json (either form)."""
    model_dir = Path(model_dir).expanduser()
    return Qwen35Config.from_hf_dict(read_config_json(model_dir), source=str(model_dir / "config.json"))


@dataclass
class _LoadPlan:
    origin: CheckpointOrigin
    sources: dict[str, list[tuple[str, str, tuple]]]  # our name -> [(file, key, index)]


def _plan(model, model_dir: Path, skip) -> _LoadPlan:
    """Which stored tensor fills which part of which parameter; a `CheckpointError` listing
    every missing, unexpected or wrongly shaped tensor. Reads only the files' headers."""
    raw = read_config_json(model_dir)
    config = model.config
    files = weight_files(model_dir)
    vision_language = "text_config" in raw or any(k.startswith(VL_TEXT_PREFIX) for k in files)
    origin = CheckpointOrigin(model_dir, raw, vision_language)
    expected = {n: p for n, p in loadable_tensors(model).items() if n not in skip}  # tied weights appear once
    sources: dict[str, list[tuple[str, str, tuple]]] = {}
    unexpected, wrong_shapes = [], []
    for key, file in files.items():
        piece = _model_piece(key, vision_language, config, getattr(model, "parameter_name", None))
        if piece is None:
            origin.carried[key] = file
        elif piece[0] in expected:
            sources.setdefault(piece[0], []).append((file, key, piece[1]))
        elif not (piece[0] == "lm_head.weight" and config.tie_word_embeddings):
            unexpected.append(key)
    for file in sorted(files_of(sources)):
        with _open(model_dir / file) as f:
            for name, key, index in pieces_in(sources, file):
                stored = f.get_slice(key)
                # the global shape of the part, from the shape alone (the parameter may be sharded)
                want = tuple(torch.empty(expected[name].shape, device="meta")[index].shape)
                shape = tuple(stored.get_shape())
                if shape != want:
                    wrong_shapes.append(f"{key}: checkpoint {shape}, model {want}")
                origin.stored_dtypes[name] = _SAFETENSORS_DTYPES.get(stored.get_dtype(), torch.float32)
    missing = sorted(n for n in expected if not _complete(sources.get(n, []), _pieces_per_parameter(n, config)))
    if missing or unexpected or wrong_shapes:
        lines = [f"checkpoint {model_dir} does not match the model built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", sorted(unexpected)), ("wrong shape", wrong_shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    return _LoadPlan(origin, sources)


def load_weights(model, model_dir, skip=frozenset()) -> None:
    """Fills the parameters of `model` (on its device, possibly sharded) from the checkpoint in
    `model_dir`, each cast to the parameter's dtype. A sharded parameter (a DTensor) reads only
    this rank's slice, so no rank ever holds the whole model. Every parameter but those named in
    `skip` must be in the checkpoint. Remembers what an export needs in `model.origin`."""
    model_dir = Path(model_dir).expanduser()
    plan = _plan(model, model_dir, skip)
    params = loadable_tensors(model)
    with torch.no_grad():
        for file in sorted(files_of(plan.sources)):
            with _open(model_dir / file) as f:
                for name, key, index in pieces_in(plan.sources, file):
                    _fill(params[name], index, f.get_slice(key))
    model.origin = plan.origin
    if plan.origin.carried and is_rank_zero():
        carried = plan.origin.carried
        kinds = sorted({k.split(".")[1] if k.startswith("model.") else k.split(".")[0] for k in carried})
        print(f"qwen35: carrying {len(carried)} tensors ({', '.join(kinds)}) through untouched; "
              "they are written back unchanged on save")


def load_pretrained(cls, model_dir, dtype: torch.dtype | None = None, device=None):
    """A whole model from a HF model directory: built on the meta device, given memory on
    `device`, filled by `load_weights`. `dtype=None` keeps every tensor's stored dtype; otherwise
    tensors are cast to `dtype` except the float32 ones the model keeps float32. (Training builds
    its model in `qwen35.build`, which shards it before it has memory.)"""
    model_dir = Path(model_dir).expanduser()
    config_class = getattr(cls, "config_class", Qwen35Config)  # the vision-language model's has its own
    config = config_class.from_hf_dict(read_config_json(model_dir), source=str(model_dir / "config.json"))
    with torch.device("meta"):
        model = cls(config)
    stored = _plan(model, model_dir, skip=()).origin.stored_dtypes
    keep_fp32 = set(model.fp32_parameter_names())
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if name in keep_fp32 else (dtype or stored[name]))
    model.to_empty(device=device or "cpu")
    model.tie_weights()
    load_weights(model, model_dir)
    return model


def loadable_tensors(model) -> dict:
    """What a checkpoint fills, by name: the parameters, and the modules that take their weight
    piece by piece (`load_piece`: the 4-bit routed experts of a QLoRA base, quantized as read)."""
    tensors = dict(model.named_parameters())
    tensors.update({n: m for n, m in model.named_modules() if hasattr(m, "load_piece")})
    return tensors


def files_of(sources) -> set[str]:
    return {file for pieces in sources.values() for file, _, _ in pieces}


def pieces_in(sources, file: str):
    return [(name, key, index) for name, pieces in sources.items() for f, key, index in pieces if f == file]


def _fill(param: torch.Tensor, index: tuple, stored) -> None:
    """Copies the part of a stored tensor that this rank holds (all of it when not sharded).

    `index` places the stored tensor inside the parameter (`()`: all of it; `(e, ...)`: expert
    e). FSDP shards dimension 0, so an expert's piece is either wholly on this rank or not.
    """
    if hasattr(param, "load_piece"):
        param.load_piece(index, stored[:])
        return
    if not isinstance(param, DTensor):
        param[index].copy_(stored[:])
        return
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if not local.numel():
        return
    if index == ():
        local.copy_(stored[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
    elif offset[0] <= index[0] < offset[0] + shape[0]:
        assert not any(offset[1:]), "expert parameters are sharded along the expert dimension only"
        local[(index[0] - offset[0], *index[1:])].copy_(stored[:])


def _export_tensors(model) -> dict[str, torch.Tensor]:
    """Checkpoint key -> tensor in its stored dtype, the tied head left out as transformers does."""
    origin = getattr(model, "origin", None)
    stored = origin.stored_dtypes if origin else {}
    prefix_vl = origin is not None and origin.vision_language
    to_key = getattr(model, "checkpoint_key", None)  # a model class's own key map
    out = {}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name, param in full.items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if to_key is not None:
            key = to_key(name)
        else:
            key = VL_TEXT_PREFIX + name[len("model."):] if prefix_vl and name.startswith("model.") else name
        tensor = param.detach().to(device="cpu", dtype=stored.get(name, param.dtype))
        out.update(_split_experts(key, tensor))
    return out


def _split_experts(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fused routed experts back into transformers' per-expert tensors; others as they are."""
    if key.endswith(".experts.gate_up_proj"):
        prefix, inner = key[: -len(".gate_up_proj")], tensor.shape[1] // 2
        out = {}
        for e in range(tensor.shape[0]):
            out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :inner].contiguous()
            out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, inner:].contiguous()
        return out
    if key.endswith(".experts.down_proj"):
        prefix = key[: -len(".down_proj")]
        return {f"{prefix}.{e}.down_proj.weight": tensor[e].contiguous() for e in range(tensor.shape[0])}
    return {key: tensor.contiguous()}


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + ([current] if current else [])


def save_pretrained(model, output_dir, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and the weights (one file, or shards with an index) to `output_dir`.

    Under FSDP every rank must call it (the full tensors are gathered); rank 0 writes.
    """
    output_dir = Path(output_dir)
    tensors = _export_tensors(model)
    if not is_rank_zero():
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    origin = getattr(model, "origin", None)
    if origin and origin.carried:
        if origin.directory.resolve() == output_dir.resolve():
            raise CheckpointError(f"cannot save over the checkpoint {output_dir} that carried tensors are read from")
        for file in sorted(set(origin.carried.values())):
            with _open(origin.directory / file) as f:
                for key in f.keys():
                    if key in origin.carried:
                        tensors[key] = f.get_tensor(key)

    shards = _shards(tensors, max_shard_bytes)
    for stale in list(output_dir.glob("model*.safetensors")) + list(output_dir.glob(INDEX_NAME)):
        stale.unlink()
    if len(shards) == 1:
        save_file({k: tensors[k] for k in shards[0]}, str(output_dir / SINGLE_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, keys in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, str(output_dir / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (output_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    if origin and origin.vision_language:
        config = origin.raw_config  # the same VL model type, served as before
    else:
        config = model.config.to_hf_dict()
        dtypes = {t.dtype for k, t in tensors.items() if not k.endswith(("A_log", "linear_attn.norm.weight"))}
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if origin:
        for extra in ("generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
            if (origin.directory / extra).is_file() and not (output_dir / extra).exists():
                shutil.copy(origin.directory / extra, output_dir / extra)
