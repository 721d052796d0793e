import math

import pytest

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.train.optim import build_optimizer, lr_factor


def test_warmup_then_cosine_reaches_the_floor():
    factors = [lr_factor(s, 10, 110, "cosine", 0.1) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_linear_and_constant_schedules():
    assert lr_factor(55, 5, 105, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(80, 5, 105, "constant", 0.0) == 1.0
    with pytest.raises(ValueError, match="optim.scheduler"):
        lr_factor(50, 5, 105, "poly", 0.0)


def test_vectors_get_no_weight_decay():
    config = Qwen35Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_key_head_dim=8,
                          linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
                          full_attention_interval=2)
    model = Qwen35ForCausalLM.from_config(config)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "model.layers.0.linear_attn.A_log" not in names and "model.norm.weight" not in names
    assert "model.layers.0.mlp.up_proj.weight" in names
    assert opt.param_groups[1]["weight_decay"] == 0.0
