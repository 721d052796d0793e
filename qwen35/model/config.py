"""The Qwen3.5 text model's arguments: one flat dataclass mirroring HF `config.json`.

A model directory's config.json comes in two forms: the text-only form (`model_type`
"qwen3_5_text", written by `Qwen3_5ForCausalLM`) and the vision-language form ("qwen3_5", the
official checkpoints), which nests the text model's arguments under `text_config`. Both read into
the same `Qwen35Config`; the raw dict is kept so that an export writes back exactly what came in.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_MODEL_TYPES = ("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe")


@dataclass
class Qwen35Config:
    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 262144
    # Rotary embedding: only the first `partial_rotary_factor` of each head is rotated.
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    # Gated DeltaNet (linear attention) layers.
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    # Mixture of experts (35B-A3B, 122B-A10B); 0 experts: every layer has the dense SwiGLU MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    router_aux_loss_coef: float = 0.001
    # "full_attention" or "linear_attention" per layer; derived from `full_attention_interval`
    # when config.json does not list them.
    layer_types: list[str] = field(default_factory=list)
    full_attention_interval: int = 4
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            n = self.full_attention_interval
            self.layer_types = [
                "full_attention" if (i + 1) % n == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {"full_attention", "linear_attention"}
        if unknown:
            raise ValueError(f"unknown layer types {sorted(unknown)} in layer_types")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        self.mrope_section = tuple(self.mrope_section)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    # --- config.json ------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Qwen35Config:
        """Reads the text model's arguments from a config.json dict (text-only or VL form)."""
        model_type = raw.get("model_type")
        if model_type not in TEXT_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not a Qwen3.5 model "
                f"(expected one of {', '.join(TEXT_MODEL_TYPES)})"
            )
        text = dict(raw["text_config"]) if "text_config" in raw else dict(raw)
        if "tie_word_embeddings" in raw and "tie_word_embeddings" not in text:
            text["tie_word_embeddings"] = raw["tie_word_embeddings"]
        rope = dict(text.pop("rope_parameters", None) or {})
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in text:
                rope.setdefault(key, text.pop(key))
        kwargs: dict[str, Any] = {k: text[k] for k in _FIELD_NAMES & text.keys()}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = float(rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            kwargs["partial_rotary_factor"] = float(rope["partial_rotary_factor"])
        if "mrope_section" in rope:
            kwargs["mrope_section"] = tuple(rope["mrope_section"])
        kwargs["layer_types"] = list(text.get("layer_types") or [])
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The text-only config.json that transformers' `Qwen3_5ForCausalLM` reads."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in _ROPE_FIELDS}
        out.pop("full_attention_interval")
        moe_fields = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "shared_expert_intermediate_size", "router_aux_loss_coef")
        for key in moe_fields if not self.num_experts else ("intermediate_size",):
            out.pop(key)
        out["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "mrope_section": list(self.mrope_section),
            "mrope_interleaved": True,
        }
        out.update(
            model_type="qwen3_5_moe_text" if self.num_experts else "qwen3_5_text",
            architectures=["Qwen3_5MoeForCausalLM" if self.num_experts else "Qwen3_5ForCausalLM"],
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
        )
        return out

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Qwen35Config:
        return cls.from_hf_dict(read_config_json(model_dir), source=str(Path(model_dir) / "config.json"))


_FIELD_NAMES = {f.name for f in dataclasses.fields(Qwen35Config)} - {"layer_types"}
_ROPE_FIELDS = {"rope_theta", "partial_rotary_factor", "mrope_section"}


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


# Published sizes, for random-initialised models (benchmarks) without a checkpoint.
# (hidden, layers, heads, kv heads, ffn, GDN value heads, tied)
_SIZES = {
    "0.8B": (1024, 24, 8, 2, 3584, 16, True),
    "2B": (2048, 24, 8, 2, 6144, 16, True),
    "4B": (2560, 32, 16, 4, 9216, 32, True),
    "9B": (4096, 32, 16, 4, 12288, 32, False),
    "27B": (5120, 64, 24, 4, 17408, 48, False),
    "35B-A3B": (2048, 40, 16, 2, 0, 32, False),  # MoE: 256 experts, top 8, expert and shared dim 512
    # MoE: 256 experts, top 8, expert and shared dim 1024. Recalled from the published config, not
    # checked against a file here (≈ 122B parameters, ≈ 10B active, as the name says).
    "122B-A10B": (3072, 48, 32, 2, 0, 64, False),
}
_MOE = {"35B-A3B": dict(num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                        shared_expert_intermediate_size=512),
        "122B-A10B": dict(num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024,
                          shared_expert_intermediate_size=1024)}
# The built-in default run's model, ~1M parameters: 4 layers alternating GDN and gated attention.
# It is sized for the project's own ~1k-entry tokenizer (`qwen35.data.tokenizer`), so its
# vocabulary size and special ids are given with it: `preset("tiny", vocab_size=len(tok), ...)`.
# Two softmax layers (interval 2, not the published 4): on the arithmetic task they copy the
# operands exactly, where one leaves answers off by one or two.
_TINY = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
    linear_num_value_heads=4, full_attention_interval=2, tie_word_embeddings=True, rope_theta=10000.0,
)
# tiny-moe: the tiny model with an MoE block in every layer: 8 experts (so that expert
# parallelism over 2, 4 or 8 ranks has whole experts per rank), top 2, a shared expert,
# transformers' default balancing coefficient.
_CPU_PRESETS = {
    "tiny": _TINY,
    "tiny-moe": dict(_TINY, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
                     shared_expert_intermediate_size=96, router_aux_loss_coef=0.001),
}
# Vision-language presets: (language preset, vision_config); out_hidden_size is the language width.
# tiny-vl: the tiny language model with a 2-block, 64-wide vision tower (an 8x8 position
# table): the built-in vision-language run's model, trained from scratch on a CPU.
# 2B-vl: the 2B language model with the published Qwen3.5 vision tower (27 blocks, width 1152,
# 16 heads, MLP 4304, patch 16, a 48x48 position table): `VisionConfig`'s defaults, which are
# transformers' `Qwen3_5VisionConfig` defaults (docs/vision.md lists them); the benchmark's
# vision-language row.
_VL_PRESETS = {"tiny-vl": ("tiny", dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                                        num_position_embeddings=64)),
               "2B-vl": ("2B", {})}
# vocabulary and special ids come from the run's tokenizer
SIZED_FOR_TOKENIZER = (*_CPU_PRESETS, "tiny-vl")
PRESETS = (*_CPU_PRESETS, *_VL_PRESETS, *_SIZES)


def preset(name: str, **overrides: Any) -> Qwen35Config:
    if name in _VL_PRESETS:
        base, vision = _VL_PRESETS[name]
        text = preset(base, **overrides)
        return Qwen35VLConfig(**{f.name: getattr(text, f.name) for f in dataclasses.fields(Qwen35Config)},
                              vision=VisionConfig(**vision, out_hidden_size=text.hidden_size))
    if name in _CPU_PRESETS:
        return Qwen35Config(**{**_CPU_PRESETS[name], **overrides})
    if name not in _SIZES:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    hidden, layers, heads, kv, ffn, v_heads, tied = _SIZES[name]
    args = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=ffn,
        linear_num_value_heads=v_heads,
        tie_word_embeddings=tied,
        eos_token_id=248046,
        **_MOE.get(name, {}),
    )
    args.update(overrides)
    return Qwen35Config(**args)


# --- vision-language ------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """The vision tower's arguments: config.json's `vision_config`."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584  # the language model's width
    num_position_embeddings: int = 2304  # a 48 x 48 table, resampled to each image's grid
    initializer_range: float = 0.02
    rope_theta: float = 10_000.0

    def __post_init__(self) -> None:
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"vision_config.hidden_act {self.hidden_act!r} is not supported (gelu_pytorch_tanh)")
        if self.hidden_size % self.num_heads:
            raise ValueError("vision_config.hidden_size must be a multiple of num_heads")
        if int(self.num_position_embeddings**0.5) ** 2 != self.num_position_embeddings:
            raise ValueError("vision_config.num_position_embeddings must be a square (a side x side table)")

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        kwargs = {k: raw[k] for k in _VISION_FIELDS & raw.keys()}
        rope = raw.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = float(rope["rope_theta"])
        return cls(**kwargs)

    def to_hf_dict(self, moe: bool) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "rope_theta"}
        out["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        out["model_type"] = "qwen3_5_moe_vision" if moe else "qwen3_5_vision"
        return out


_VISION_FIELDS = {f.name for f in dataclasses.fields(VisionConfig)} - {"rope_theta"}


@dataclass
class Qwen35VLConfig(Qwen35Config):
    """The vision-language model: the text model's arguments (inherited, read from
    `text_config`), the vision tower's, and the media token ids."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> Qwen35VLConfig:
        if "vision_config" not in raw:
            raise ValueError(f"{source}: no vision_config; not a vision-language checkpoint "
                             "(load it with Qwen35ForCausalLM)")
        text = Qwen35Config.from_hf_dict(raw, source)
        tokens = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                      "vision_end_token_id") if k in raw}
        return cls(**{f.name: getattr(text, f.name) for f in dataclasses.fields(Qwen35Config)},
                   vision=VisionConfig.from_hf_dict(raw["vision_config"]), **tokens)

    def text_config(self) -> Qwen35Config:
        return Qwen35Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Qwen35Config)})

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that transformers' `Qwen3_5(Moe)ForConditionalGeneration` reads."""
        moe = self.num_experts > 0
        text = self.text_config().to_hf_dict()
        text.pop("architectures")
        return {
            "model_type": "qwen3_5_moe" if moe else "qwen3_5",
            "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
            "text_config": text,
            "vision_config": self.vision.to_hf_dict(moe),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
