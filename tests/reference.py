"""Tiny random Qwen3.5 models built by transformers: the reference every test compares against."""

from __future__ import annotations

import torch
from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig

from qwen35 import Qwen35ForCausalLM

# Each differs where the architecture has a choice: tying, GQA ratio, GDN value heads per key
# head, full-attention interval, explicit layer_types.
TINY_CONFIGS = {
    "tied_interval2_gva2": dict(
        tie_word_embeddings=True, num_hidden_layers=4, full_attention_interval=2,
        num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=4,
    ),
    "untied_interval4_gqa4": dict(
        tie_word_embeddings=False, num_hidden_layers=4, full_attention_interval=4,
        num_attention_heads=4, num_key_value_heads=1, linear_num_key_heads=2, linear_num_value_heads=2,
    ),
    "explicit_layer_types_gva4": dict(
        tie_word_embeddings=False, num_hidden_layers=5,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=2, num_key_value_heads=2, linear_num_key_heads=1, linear_num_value_heads=4,
    ),
}


def tiny_text_config(name: str = "tied_interval2_gva2", **overrides) -> Qwen3_5TextConfig:
    args = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, head_dim=16,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    args.update(TINY_CONFIGS[name])
    args.update(overrides)
    interval = args.pop("full_attention_interval", None)
    config = Qwen3_5TextConfig(**args, **({"full_attention_interval": interval} if interval else {}))
    config._attn_implementation = "eager"
    return config


# Our config of the same shape as transformers' "tied_interval2_gva2" (without tying), for tests
# that need our model only.
TINY_CONFIG = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, full_attention_interval=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=8, linear_value_head_dim=8,
)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over all elements (float32), `b` the reference."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def perturb_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised (1+w) norm weights would hide a wrong `w` vs `1+w`, so every norm weight
    and dt_bias is moved off its initial value. A = exp(A_log) is drawn from (0.05, 0.5): with the
    initial range up to 16 most heads forget everything at each step, and the gradients of A_log
    and dt_bias vanish to rounding noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "dt_bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("A_log"):
                p.copy_((0.05 + 0.45 * torch.rand(p.shape, generator=gen)).log())


def hf_text_model(name: str = "tied_interval2_gva2", seed: int = 0, **overrides) -> Qwen3_5ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(tiny_text_config(name, **overrides)).float().eval()
    perturb_norms(model, seed)
    return model


def hf_vl_model(seed: int = 0) -> Qwen3_5ForConditionalGeneration:
    torch.manual_seed(seed)
    text = tiny_text_config("untied_interval4_gqa4").to_dict()
    config = Qwen3_5Config(
        text_config=text,
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32),
    )
    model = Qwen3_5ForConditionalGeneration(config).float().eval()
    perturb_norms(model, seed)
    return model


def ours_from_hf(hf_model, tmp_path, dtype=None) -> Qwen35ForCausalLM:
    """Our model loaded, through our loader, from what transformers saved."""
    directory = tmp_path / "hf_saved"
    hf_model.save_pretrained(directory)
    return Qwen35ForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def tiny_model_dir(directory, name: str = "tied_interval2_gva2", seed: int = 0, moe: bool = False, **overrides):
    """A complete model directory, as downloaded from a hub but tiny: transformers-saved weights,
    config.json and the project's small tokenizer with its chat template. `overrides` go to
    the model config."""
    from qwen35.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(directory)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = hf_moe_model(seed, **ids, **overrides) if moe else hf_text_model(name, seed, **ids, **overrides)
    model.save_pretrained(directory)
    return directory


def hf_moe_model(seed: int = 0, **overrides):
    """A tiny transformers Qwen3_5MoeForCausalLM: 4 experts, top 2, a shared expert."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    args = tiny_text_config("tied_interval2_gva2").to_dict()
    args = {k: v for k, v in args.items() if k in Qwen3_5MoeTextConfig.__dataclass_fields__}
    args.update(tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                shared_expert_intermediate_size=24, router_aux_loss_coef=0.01, output_router_logits=True)
    args.update(overrides)
    for key in ("intermediate_size", "model_type"):
        args.pop(key, None)
    config = Qwen3_5MoeTextConfig(**args)
    config._attn_implementation = "eager"
    model = Qwen3_5MoeForCausalLM(config).float().eval()
    perturb_norms(model, seed)
    return model


def read_safetensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `directory`."""
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# Media token ids of the tiny vision-language models (the real ones are 248053-248057).
VL_TOKENS = dict(vision_start_token_id=92, vision_end_token_id=93, image_token_id=94, video_token_id=95)


def hf_vl_media_model(moe: bool = False, seed: int = 0):
    """A tiny transformers Qwen3_5(Moe)ForConditionalGeneration for media inputs: a 2-block
    vision tower (patch 16, temporal patch 2, 2x2 merge, a 6x6 position table) and a text model
    whose rotary turns 2 frequencies per M-RoPE axis."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "mrope_section": [2, 2, 2], "mrope_interleaved": True}
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
                  num_position_embeddings=36)
    if moe:
        text = hf_moe_model(seed, rope_parameters=rope).config.to_dict()
        config = Qwen3_5MoeConfig(text_config=text, vision_config=vision, **VL_TOKENS)
        config.text_config._attn_implementation = "eager"
        model = Qwen3_5MoeForConditionalGeneration(config)
    else:
        text = tiny_text_config("untied_interval4_gqa4", rope_parameters=rope).to_dict()
        config = Qwen3_5Config(text_config=text, vision_config=vision, **VL_TOKENS)
        config.text_config._attn_implementation = "eager"
        model = Qwen3_5ForConditionalGeneration(config)
    model = model.float().eval()
    perturb_norms(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # vision biases start at zero: move them so their gradients mean something
        for name, p in model.named_parameters():
            if name.startswith("model.visual.") and name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def vl_media_batch() -> dict:
    """Inputs for `hf_vl_media_model`'s vocabulary: one row of text, a 64x64 image (4 tokens after
    the merger), text."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 90, (1, 12), generator=gen)
    ids[0, 3], ids[0, 4:8], ids[0, 8] = 92, 94, 93  # vision start, image pads, vision end
    return dict(input_ids=ids, pixel_values=torch.randn(16, 1536, generator=gen),
                image_grid_thw=torch.tensor([[1, 4, 4]]), mm_token_type_ids=(ids == 94).long())


def write_video(path, frames, fps: int = 8):
    """An MPEG-4 video of `frames` (uint8 [T, H, W, 3], H and W even) at `fps`, written with PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def random_adapters(model, std: float = 0.05) -> None:
    """Every adapter weight drawn from a seed of its name (B included, which starts at zero), so
    an adapter changes the output and two models with the same targets get the same adapters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * std)


def copy_dequantized(qlora, plain, dtype) -> None:
    """Gives `plain` (the same model in float) the dequantized weights of `qlora`'s 4-bit routed
    experts and linear layers."""
    import bitsandbytes as bnb

    from qwen35.lora.nf4_experts import NF4ExpertWeight

    with torch.no_grad():
        for name, module in qlora.named_modules():
            if isinstance(module, NF4ExpertWeight):
                plain.get_parameter(name).copy_(module.dequantize(dtype))
            elif isinstance(module, bnb.nn.Linear4bit):
                plain.get_submodule(name).weight.copy_(
                    bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state))
