import math

import pytest

from reference import TINY_CONFIG
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
    config = Qwen35Config(**TINY_CONFIG)
    model = Qwen35ForCausalLM.from_config(config)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "model.layers.0.linear_attn.A_log" not in names and "model.norm.weight" not in names
    assert "model.layers.0.mlp.up_proj.weight" in names
    assert opt.param_groups[1]["weight_decay"] == 0.0


def _adamw_reference(w, grads, lr, betas, eps, weight_decay):
    """AdamW written out in float64: decoupled decay, bias-corrected moments."""
    w, m, v = w.double(), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        w = w * (1 - lr * weight_decay) - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return w


SETTINGS = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("moments", ["float32", "8bit"])
def test_kahan_adamw_step_is_adamw_and_the_compensation_holds_what_rounding_dropped(moments):
    import torch

    from qwen35.train.kahan import KahanAdamW

    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(64, 96, generator=gen) * 0.05).to(torch.bfloat16))  # 6144 >= 4096: 8-bit
    grad = torch.randn(p.shape, generator=gen)
    expected = _adamw_reference(p.detach().float(), [grad.to(torch.bfloat16)], **SETTINGS)
    optimizer = KahanAdamW([p], **SETTINGS, moments=moments)
    p.grad = grad.to(torch.bfloat16)
    optimizer.step()
    state = optimizer.state[p]
    assert ("exp_avg_8bit" in state) == (moments == "8bit") and state["compensation"].dtype == torch.bfloat16
    held = p.detach().double() + state["compensation"].double()
    # the pair (weight, compensation) holds the float32 result to ~16 significant bits ...
    # (relative to the weight, or to the step for a weight that the step brought near 0)
    assert ((held - expected).abs() <= (expected.abs() + SETTINGS["lr"]) * 2**-15).all()
    # ... while the weight alone is the nearest bf16, which a plain bf16 update would also give
    assert (p.detach().double() - expected).abs().max() > 1e-5
    assert (p.detach() == expected.to(torch.bfloat16)).float().mean() > 0.99


def test_float32_parameters_get_no_compensation_and_plain_adamw():
    import torch

    from qwen35.train.kahan import KahanAdamW

    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(16, generator=gen))
    grads = [torch.randn(16, generator=gen) for _ in range(3)]
    expected = _adamw_reference(p.detach(), grads, **SETTINGS)
    optimizer = KahanAdamW([p], **SETTINGS, moments="8bit")
    for g in grads:
        p.grad = g
        optimizer.step()
    assert "compensation" not in optimizer.state[p] and "exp_avg" in optimizer.state[p]  # small: float32 moments
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)


def test_bitsandbytes_adamw8bit_first_step_is_adamw_on_float32_masters():
    import torch

    config = Qwen35Config(**TINY_CONFIG)
    model = Qwen35ForCausalLM.from_config(config)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, name="adamw8bit")
    assert type(opt).__name__ == "AdamW8bit"
    weight = model.model.layers[0].mlp.up_proj.weight  # 48 x 32 = 1536 elements: bitsandbytes keeps float32 state
    big = model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(2)
    before = {p: p.detach().clone() for p in (weight, big)}
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for p in (weight, big):
        expected = _adamw_reference(before[p], [p.grad], **SETTINGS)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_kahan_tracks_float32_masters_where_plain_bf16_stalls_at_a_fine_tuning_lr():
    """500 steps at lr 1e-5 on weights of size ~0.05: each update is below half a bf16 spacing."""
    import torch

    from qwen35.train.kahan import KahanAdamW

    gen = torch.Generator().manual_seed(3)
    start = (torch.randn(128, 64, generator=gen) * 0.05).to(torch.bfloat16)
    settings = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    master = torch.nn.Parameter(start.float())
    kahan, kahan8, plain = (torch.nn.Parameter(start.clone()) for _ in range(3))
    optimizers = [(master, torch.optim.AdamW([master], foreach=False, **settings)),
                  (kahan, KahanAdamW([kahan], **settings)), (kahan8, KahanAdamW([kahan8], **settings, moments="8bit")),
                  (plain, torch.optim.AdamW([plain], foreach=False, **settings))]
    drift = torch.randn(start.shape, generator=gen)  # a steady direction under the noise: the weights must move
    for _ in range(200):
        g = drift + torch.randn(start.shape, generator=gen)
        for p, optimizer in optimizers:
            p.grad = g.to(p.dtype)
            optimizer.step()
    moved = (master.detach() - start.float()).abs().mean()
    assert moved > 5e-4
    for p, optimizer, bound in ((kahan, optimizers[1][1], 0.02), (kahan8, optimizers[2][1], 0.1)):
        held = p.detach().float() + optimizer.state[p]["compensation"].float()
        err = (held - master.detach()).abs().mean()
        assert err < bound * moved, (err, moved)
    plain_moved = (plain.detach().float() - start.float()).abs().mean()
    assert plain_moved < 0.5 * moved, (plain_moved, moved)


def test_adamw_in_backward_is_fused_adamw_and_frees_each_gradient_in_the_backward():
    import torch
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from qwen35.train.optim import AdamWInBackward

    config = Qwen35Config(**TINY_CONFIG)
    torch.manual_seed(0)
    plain = Qwen35ForCausalLM.from_config(config)
    ours = Qwen35ForCausalLM.from_config(config)
    ours.load_state_dict(plain.state_dict())
    groups = build_optimizer(plain, **SETTINGS).param_groups
    reference = torch.optim.AdamW(groups, **SETTINGS, fused=True)  # the same kernel, on the CPU
    in_backward = build_optimizer(ours, **SETTINGS, in_backward=True)
    assert isinstance(in_backward, AdamWInBackward)
    # the checkpoint's state-dict helper finds a state, so it runs no step on zero gradients of
    # every parameter at once to create one (that step would count)
    get_optimizer_state_dict(ours, in_backward)
    assert all(in_backward.state[p]["step"] == 0 for p in ours.parameters())
    held = []  # how many parameters hold a gradient whenever the last one's is produced
    list(ours.parameters())[-1].register_hook(lambda g: held.append(sum(p.grad is not None for p in ours.parameters())))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 17), generator=gen)
        plain(input_ids=ids, labels=ids).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), math.inf)
        reference.step()
        reference.zero_grad(set_to_none=True)
        ours(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in ours.parameters())
        torch.testing.assert_close(in_backward.take_grad_norm(), norm, rtol=1e-5, atol=0)
        in_backward.step()  # no gradient left: changes nothing
    assert held and max(held) < len(list(ours.parameters())) // 2
    # The gradients are the same, but the CPU kernel rounds a tensor updated alone differently from
    # one updated in a list (1 ulp after the first step), and Adam's normalisation grows that in
    # the later steps' gradients to ~1e-4 of an update (lr 1e-3); a wrong term would be off by a
    # whole update. On the GPU the two are equal bit for bit (tests/gpu/test_training_run.py).
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * SETTINGS["lr"], msg=lambda m: f"{name}: {m}")
    theirs, mine = reference.state_dict(), in_backward.state_dict()
    assert mine["param_groups"] == [{k: v for k, v in g.items() if k in mine["param_groups"][0]}
                                    for g in theirs["param_groups"]]
    for key, value in theirs["state"].items():
        assert mine["state"][key]["step"] == value["step"] == 3
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine["state"][key][k], value[k], rtol=1e-3, atol=1e-9)


def test_adamw_in_backward_leaves_the_rest_of_a_step_alone_after_a_gradient_that_is_not_finite():
    import torch

    from qwen35.train.optim import AdamWInBackward

    first = torch.nn.Parameter(torch.ones(4))
    second = torch.nn.Parameter(torch.ones(4))
    optimizer = AdamWInBackward([first, second], **SETTINGS)
    (first * 2).sum().backward()  # finite: applied
    assert (first < 1).all()
    (second * float("nan")).sum().backward()  # not finite: skipped, its step not counted
    (first * 2).sum().backward()  # same step, after the non-finite one: skipped too
    assert (second == 1).all() and optimizer.state[second]["step"] == 0
    assert optimizer.state[first]["step"] == 1
    assert not torch.isfinite(optimizer.take_grad_norm())
    (first * 2).sum().backward()  # the next step updates again
    assert optimizer.state[first]["step"] == 2


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_an_optimizer_updating_in_the_backward_is_freed_when_dropped_and_its_hooks_then_do_nothing(cpu_offload):
    """The parameters' hooks must not keep the optimizer (and its state: 12 bytes per weight) alive
    as long as the model: a benchmark building one after another ran out of host memory so."""
    import gc
    import weakref

    import torch

    model = torch.nn.Linear(8, 8)
    optimizer = build_optimizer(model, **SETTINGS, cpu_offload=cpu_offload, in_backward=True)
    model(torch.ones(2, 8)).sum().backward()
    optimizer.take_grad_norm()  # the step's end, as the trainer calls it: the offloaded update is done
    assert model.weight.grad is None
    dropped = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert dropped() is None
    before = model.weight.detach().clone()
    model(torch.ones(2, 8)).sum().backward()
    assert model.weight.grad is not None and torch.equal(model.weight, before)
