import math

import pytest
import torch

from reference import TINY_CONFIG
from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.train.offload import OffloadedAdamW
from qwen35.train.optim import build_optimizer, clip_gradients

SETTINGS = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def test_offloaded_adamw_equals_adamw_and_keeps_float32_masters_of_bf16_weights():
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


def _tiny_models(count: int, dtype=torch.float32):
    config = Qwen35Config(**TINY_CONFIG)
    torch.manual_seed(0)
    first = Qwen35ForCausalLM.from_config(config).to(dtype)
    models = [first]
    for _ in range(count - 1):
        models.append(Qwen35ForCausalLM.from_config(config).to(dtype))
        models[-1].load_state_dict(first.state_dict())
    return config, models


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_and_the_update_in_the_backward_change_nothing_in_the_arithmetic(dtype):
    """The pipeline's chunks (here 64 elements: every parameter in many pieces, through all the
    slots) and the hand-over inside the backward give the weights and state of one whole-tensor
    update after the backward, bit for bit; the gradients are gone after the backward."""
    config, (whole, chunked, in_backward) = _tiny_models(3, dtype)
    optimizers = {
        "whole": build_optimizer(whole, **SETTINGS, cpu_offload=True),
        "chunked": OffloadedAdamW(build_optimizer(chunked, **SETTINGS).param_groups, **SETTINGS, chunk_numel=64),
        "in_backward": build_optimizer(in_backward, **SETTINGS, cpu_offload=True, in_backward=True),
    }
    assert optimizers["in_backward"].updates_in_backward and not optimizers["whole"].updates_in_backward
    models = {"whole": whole, "chunked": chunked, "in_backward": in_backward}
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 17), generator=gen)
        norms = {}
        for name, model in models.items():
            model(input_ids=ids, labels=ids).loss.backward()
            if name == "in_backward":
                assert all(p.grad is None for p in model.parameters())
            norms[name] = clip_gradients(optimizers[name], model.parameters(), 0.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        # clip_grad_norm_ gives bf16 gradients' norm in bf16
        rtol = 1e-5 if dtype == torch.float32 else 2 ** -8
        torch.testing.assert_close(norms["in_backward"], norms["whole"].float(), rtol=rtol, atol=0)
    for name in ("chunked", "in_backward"):
        for (key, a), b in zip(models[name].named_parameters(), whole.parameters()):
            assert torch.equal(a, b), (name, key)
        for a, b in zip(optimizers[name].state.values(), optimizers["whole"].state.values()):
            assert a["step"] == b["step"] == 3
            assert all(torch.equal(a[k], b[k]) for k in ("master", "exp_avg", "exp_avg_sq"))


def test_the_state_exists_before_the_first_step_so_checkpointing_runs_no_step():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _, (model,) = _tiny_models(1)
    optimizer = build_optimizer(model, **SETTINGS, cpu_offload=True, in_backward=True)
    state = get_optimizer_state_dict(model, optimizer)
    assert state["state"] and all(s["step"] == 0 for s in optimizer.state.values())
    assert all(p.grad is None for p in model.parameters())


def test_the_update_in_the_backward_leaves_the_rest_of_a_step_alone_after_a_gradient_that_is_not_finite():
    first = torch.nn.Parameter(torch.ones(4))
    second = torch.nn.Parameter(torch.ones(4))
    optimizer = OffloadedAdamW([first, second], **SETTINGS, in_backward=True)
    (first * 2).sum().backward()  # finite: applied
    (second * float("nan")).sum().backward()  # not finite: skipped, its step not counted
    (first * 2).sum().backward()  # same step, after the non-finite one: skipped too
    assert not math.isfinite(optimizer.take_grad_norm())
    assert (first < 1).all() and (second == 1).all()
    assert optimizer.state[first]["step"] == 1 and optimizer.state[second]["step"] == 0
    (first * 2).sum().backward()  # the next step updates again
    assert math.isfinite(optimizer.take_grad_norm()) and optimizer.state[first]["step"] == 2


def test_a_failing_update_is_raised_at_the_end_of_the_step_instead_of_hanging(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(200)) for _ in range(6)]
    optimizer = OffloadedAdamW(params, **SETTINGS, chunk_numel=64)  # more chunks than slots
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of host memory")

    monkeypatch.setattr(torch, "_fused_adamw_", failing)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="offloaded AdamW step failed") as failure:
        optimizer.step()
    assert "out of host memory" in str(failure.value.__cause__)
    assert len(calls) == 5  # the rest of the step was left alone
    with pytest.raises(ValueError, match="multiple of 64"):
        OffloadedAdamW(params, **SETTINGS, chunk_numel=100)
