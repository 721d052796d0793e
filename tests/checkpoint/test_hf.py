"""HF checkpoints: round trips, transformers interop, VL checkpoints, fp32 tensors, bad input."""

import json

import pytest
import torch
from transformers import Qwen3_5ForCausalLM

from reference import read_safetensors, hf_text_model, hf_vl_model, ours_from_hf
from qwen35 import Qwen35ForCausalLM
from qwen35.checkpoint.hf import CheckpointError




def _bitwise_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.view(torch.uint8).equal(b.view(torch.uint8))


def test_save_load_save_gives_identical_tensors_and_shards(tmp_path):
    model = ours_from_hf(hf_text_model("untied_interval4_gqa4"), tmp_path)
    model.save_pretrained(tmp_path / "a", max_shard_bytes=20_000)
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "a").glob("*.safetensors"))) > 1
    Qwen35ForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b", max_shard_bytes=20_000)
    first, second = read_safetensors(tmp_path / "a"), read_safetensors(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(_bitwise_equal(first[k], second[k]) for k in first)


def test_our_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    ours = ours_from_hf(hf_text_model("tied_interval2_gva2"), tmp_path)
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=30_000)
    theirs = Qwen3_5ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5


def test_vl_checkpoint_loads_and_carries_vision_and_mtp_weights_bit_identical(tmp_path, capsys):
    vl = hf_vl_model()
    vl.save_pretrained(tmp_path / "vl")
    source = read_safetensors(tmp_path / "vl")
    source["mtp.fc.weight"] = torch.randn(8, 8)  # official checkpoints also carry MTP weights
    from safetensors.torch import save_file
    save_file(source, str(tmp_path / "vl" / "model.safetensors"), metadata={"format": "pt"})

    ours = Qwen35ForCausalLM.from_pretrained(tmp_path / "vl")
    assert "carrying" in capsys.readouterr().out
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vl.model.language_model(ids).last_hidden_state
        assert (ours.model(ids) - expected).abs().max().item() <= 1e-5
    ours.save_pretrained(tmp_path / "out")
    saved = read_safetensors(tmp_path / "out")
    assert saved.keys() == source.keys()
    assert all(_bitwise_equal(saved[k], source[k]) for k in source)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and "vision_config" in config


def test_fp32_tensors_stay_fp32_in_memory_and_on_disk(tmp_path):
    hf = hf_text_model("tied_interval2_gva2")
    hf.to(torch.bfloat16)
    for name, p in hf.named_parameters():
        if name.endswith(("A_log", "linear_attn.norm.weight")):
            p.data = p.data.float()
    hf.save_pretrained(tmp_path / "mixed")
    model = Qwen35ForCausalLM.from_pretrained(tmp_path / "mixed", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert params["model.layers.0.linear_attn.A_log"].dtype == torch.float32
    assert params["model.layers.0.linear_attn.norm.weight"].dtype == torch.float32
    assert params["model.layers.0.linear_attn.in_proj_qkv.weight"].dtype == torch.bfloat16
    model.to_compute_dtype(torch.float32)  # e.g. fp32 master weights during training
    model.save_pretrained(tmp_path / "out")
    saved = read_safetensors(tmp_path / "out")
    source = read_safetensors(tmp_path / "mixed")
    for key, tensor in source.items():
        assert saved[key].dtype == tensor.dtype, key
    assert _bitwise_equal(saved["model.layers.0.linear_attn.A_log"], source["model.layers.0.linear_attn.A_log"])


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen35ForCausalLM.from_pretrained(tmp_path)


def test_config_of_another_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not a Qwen3.5"):
        Qwen35ForCausalLM.from_pretrained(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    hf_text_model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        Qwen35ForCausalLM.from_pretrained(tmp_path)


def test_wrong_shapes_and_missing_keys_are_listed_in_one_error(tmp_path):
    hf_text_model().save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path)
    tensors["model.norm.weight"] = torch.zeros(5)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(1)
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        Qwen35ForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected (1): model.layers.0.extra.weight" in message
    assert "model.norm.weight: checkpoint (5,), model (32,)" in message
