"""Our model against transformers' Qwen3_5ForCausalLM built from the same tiny config."""

import pytest
import torch

from reference import TINY_CONFIGS, hf_text_model, ours_from_hf, relative_error
from qwen35 import Qwen35ForCausalLM
from qwen35.model.config import Qwen35Config


@pytest.fixture(params=list(TINY_CONFIGS))
def models(request, tmp_path):
    hf = hf_text_model(request.param)
    return hf, ours_from_hf(hf, tmp_path)


def test_logits_match_transformers(models):
    hf, ours = models
    ids = torch.randint(0, hf.config.vocab_size, (2, 75), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        actual = ours(ids).logits
    assert (actual - expected).abs().max().item() <= 1e-5


def test_loss_and_every_gradient_match_transformers(models):
    hf, ours = models
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, hf.config.vocab_size, (2, 70), generator=gen)
    labels = ids.clone()
    labels[:, :9] = -100
    hf_loss = hf(ids, labels=labels).loss
    hf_loss.backward()
    our_loss = ours(ids, labels=labels).loss
    our_loss.backward()
    assert relative_error(our_loss.detach(), hf_loss.detach()) <= 1e-4
    hf_grads = dict(hf.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert set(names) == set(hf_grads)
    for name, param in ours.named_parameters():
        assert relative_error(param.grad, hf_grads[name].grad) <= 1e-4, name


def test_config_reads_text_and_vl_forms(models):
    hf, ours = models
    text = hf.config.to_dict()
    vl = {"model_type": "qwen3_5", "text_config": text, "tie_word_embeddings": text["tie_word_embeddings"]}
    assert Qwen35Config.from_hf_dict(text) == Qwen35Config.from_hf_dict(vl) == ours.config
    assert ours.config.layer_types == list(hf.config.layer_types)


def test_init_weights_after_meta_construction_matches_transformers_kind():
    config = Qwen35Config(
        vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=True, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Qwen35ForCausalLM.from_config(config)
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    assert params["model.norm.weight"].abs().max() == 0  # (1+w) norms start at w = 0
    assert torch.all(params["model.layers.0.linear_attn.norm.weight"] == 1)
    assert torch.all(params["model.layers.0.linear_attn.dt_bias"] == 1)
    a = params["model.layers.0.linear_attn.A_log"].exp()
    assert a.min() >= 0.01 and a.max() <= 16
    std = params["model.layers.0.mlp.up_proj.weight"].std().item()
    assert 0.015 < std < 0.025
    assert params["model.embed_tokens.weight"][0].abs().max() == 0  # padding row


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_model_materialised_in_bf16_starts_from_the_float32_models_weights_rounded(device):
    """Built as the trainer builds it (on meta, cast to the parameter dtype, then memory and
    `init_weights`): torch draws a bf16 normal from the float32 numbers and rounds them, on the CPU
    and the GPU, so runs of two precisions from one seed start from one point."""
    config = Qwen35Config(
        vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4,
    )

    def materialised(dtype):
        with torch.device("meta"):
            model = Qwen35ForCausalLM(config)
        model.to_compute_dtype(dtype)
        model.to_empty(device=device)
        model.tie_weights()
        torch.manual_seed(0)
        model.init_weights()
        return dict(model.named_parameters())

    low, full = materialised(torch.bfloat16), materialised(torch.float32)
    assert low["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    for name, p in low.items():
        assert torch.equal(p, full[name].to(p.dtype)), name
