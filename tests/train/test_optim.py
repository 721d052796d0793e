import math

import pytest

from reference import TINY_CONFIG
from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.train.optim import OffloadedAdamW, build_optimizer, lr_factor


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
    config = Qwen35Config(**TINY_CONFIG)
    model = Qwen35ForCausalLM.from_config(config)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "model.layers.0.linear_attn.A_log" not in names and "model.norm.weight" not in names
    assert "model.layers.0.mlp.up_proj.weight" in names
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_offloaded_adamw_equals_adamw_and_keeps_float32_masters_of_bf16_weights():
    import torch

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 32, generator=gen), torch.randn(32, generator=gen)]
    grads = [[torch.randn(w.shape, generator=gen) for w in weights] for _ in range(5)]
    plain = [torch.nn.Parameter(w.clone()) for w in weights]
    offloaded = [torch.nn.Parameter(w.clone()) for w in weights]
    low = [torch.nn.Parameter(w.to(torch.bfloat16)) for w in weights]
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    reference = torch.optim.AdamW(plain, foreach=False, **settings)
    ours = OffloadedAdamW(offloaded, **settings)
    ours_low = OffloadedAdamW(low, **settings)
    for step_grads in grads:
        for params, optimizer in ((plain, reference), (offloaded, ours), (low, ours_low)):
            for p, g in zip(params, step_grads):
                p.grad = g.to(p.dtype)
            optimizer.step()
    for a, b in zip(offloaded, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for p, b in zip(low, plain):
        master = ours_low.state[p]["master"]
        assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
        torch.testing.assert_close(p, master.to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(master, b, rtol=1e-2, atol=1e-3)  # only the bf16-rounded grads differ
