"""Vision-language checkpoints: transformers' load in ours, ours load in transformers."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

from reference import hf_vl_media_model, read_safetensors, vl_media_batch
from qwen35 import Qwen35ForConditionalGeneration
from qwen35.checkpoint.hf import CheckpointError
from qwen35.model import Qwen35VLConfig



def test_transformers_checkpoint_loads_and_saves_back_bit_identical_with_mtp(tmp_path):
    hf = hf_vl_media_model(moe=True)
    hf.save_pretrained(tmp_path / "hf")
    source = read_safetensors(tmp_path / "hf")
    source["mtp.fc.weight"] = torch.randn(8, 8)  # official checkpoints carry MTP weights
    save_file(source, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    ours = Qwen35ForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert any(k.startswith("model.language_model.layers.0.mlp.experts.0.") for k in source)  # per expert on disk
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=100_000)
    saved = read_safetensors(tmp_path / "ours")
    assert saved.keys() == source.keys()
    assert all(torch.equal(saved[k], source[k]) and saved[k].dtype == source[k].dtype for k in source)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and config["vision_config"]["depth"] == 2


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_our_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, moe):
    """A model built from our config alone (no source checkpoint) writes the VL config.json."""
    config = Qwen35VLConfig.from_hf_dict(hf_vl_media_model(moe=moe).config.to_dict())
    torch.manual_seed(0)
    ours = Qwen35ForConditionalGeneration.from_config(config).eval()
    ours.save_pretrained(tmp_path / "ours")
    transformers_class = Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration
    theirs = transformers_class.from_pretrained(tmp_path / "ours").eval()
    batch = vl_media_batch()
    with torch.no_grad():
        assert (theirs(**batch).logits - ours(**batch).logits).abs().max().item() <= 1e-5


def test_load_in_bf16_keeps_the_float32_parameters(tmp_path):
    hf_vl_media_model().save_pretrained(tmp_path / "hf")
    ours = Qwen35ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    kept = set(ours.fp32_parameter_names())
    assert kept and all(n.startswith("model.language_model.") for n in kept)
    for name, param in ours.named_parameters():
        assert param.dtype == (torch.float32 if name in kept else torch.bfloat16), name


def test_a_text_only_checkpoint_is_refused_with_a_clear_error(tmp_path):
    from reference import hf_text_model

    hf_text_model().save_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match="no vision_config"):
        Qwen35ForConditionalGeneration.from_pretrained(tmp_path / "text")


def test_a_wrongly_shaped_vision_tensor_is_named(tmp_path):
    hf_vl_media_model().save_pretrained(tmp_path / "hf")
    tensors = read_safetensors(tmp_path / "hf")
    tensors["model.visual.pos_embed.weight"] = torch.zeros(49, 32)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.visual.pos_embed.weight"):
        Qwen35ForConditionalGeneration.from_pretrained(tmp_path / "hf")
