"""Activation checkpointing and layer compilation change neither the numbers nor the names, of
the text model and of the vision-language one (vision blocks included)."""

import pytest
import torch

from reference import TINY_CONFIG, hf_vl_media_model, vl_media_batch
from qwen35 import Qwen35Config, Qwen35ForCausalLM, Qwen35ForConditionalGeneration
from qwen35.model import Qwen35VLConfig
from qwen35.parallel.checkpointing import apply_activation_checkpointing
from qwen35.parallel.compile import compile_layers


def _tiny_model(seed=0):
    config = Qwen35Config(**TINY_CONFIG, tie_word_embeddings=True, mrope_section=(1, 1, 0))
    torch.manual_seed(seed)
    return Qwen35ForCausalLM.from_config(config)


def _packed_batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (1, 45), generator=gen)
    return ids, torch.tensor([0, 20, 33, 45], dtype=torch.int32)


def _loss_and_grads(model):
    ids, cu = _packed_batch()
    out = model(ids, cu_seqlens=cu, labels=ids)
    out.loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out.loss.detach(), grads


@pytest.mark.parametrize("mode", ["full", "selective", "offload"])
def test_checkpointing_gives_the_same_loss_and_gradients(mode):
    plain = _tiny_model()
    loss_plain, grads_plain = _loss_and_grads(plain)
    # offload: MLPs and delta rules over 16-token slices of the 45-token row [0, 20, 33, 45]
    checkpointed = apply_activation_checkpointing(_tiny_model(), mode, slice_tokens=16)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed)
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_keeps_parameter_names_and_state_dict_keys(mode):
    model = _tiny_model()
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    apply_activation_checkpointing(model, mode)
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys
    assert all(getattr(layer, "activation_checkpointing", False) for layer in model.model.layers)


def test_checkpointing_twice_or_an_unknown_mode_is_refused():
    model = apply_activation_checkpointing(_tiny_model(), "full")
    with pytest.raises(ValueError, match="already"):
        apply_activation_checkpointing(model, "full")
    with pytest.raises(ValueError, match="selective"):
        apply_activation_checkpointing(_tiny_model(), "everything")


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_compiled_layers_give_the_same_loss_and_keep_names(mode):
    plain = _tiny_model()
    loss_plain, grads_plain = _loss_and_grads(plain)
    model = _tiny_model()
    keys = list(model.state_dict())
    compile_layers(apply_activation_checkpointing(model, mode), backend="aot_eager")
    loss, grads = _loss_and_grads(model)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(loss, loss_plain, rtol=1e-6, atol=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def _vl_loss_and_grads(model):
    batch = vl_media_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("mode", ["full", "selective", "offload"])
def test_the_vision_tower_is_checkpointed_and_compiled_with_the_same_gradients(mode):
    config = Qwen35VLConfig.from_hf_dict(hf_vl_media_model().config.to_dict())

    def model():
        torch.manual_seed(0)
        return Qwen35ForConditionalGeneration.from_config(config)

    grads_plain = _vl_loss_and_grads(model())
    changed = compile_layers(apply_activation_checkpointing(model(), mode), backend="aot_eager")
    blocks = changed.model.visual.blocks
    assert all(getattr(b, "activation_checkpointing", False) and b._compiled_call_impl is not None for b in blocks)
    grads = _vl_loss_and_grads(changed)
    assert grads.keys() == grads_plain.keys() and any(n.startswith("model.visual.blocks.") for n in grads)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_adapters_compose_with_checkpointing_and_compile():
    from qwen35.lora import LoraSettings, apply_lora

    def adapted():
        model = _tiny_model()
        apply_lora(model, LoraSettings(rank=2, alpha=4, target_modules=["q_proj", "in_proj_qkv", "down_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        return model

    loss_plain, grads_plain = _loss_and_grads(adapted())
    wrapped = compile_layers(apply_activation_checkpointing(adapted(), "full"), backend="aot_eager")
    loss, grads = _loss_and_grads(wrapped)
    torch.testing.assert_close(loss, loss_plain, rtol=1e-6, atol=1e-6)
    assert {n for n, g in grads.items() if g is not None} == {n for n in grads if "lora_" in n}
    for name, grad in grads_plain.items():
        if grad is not None:
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_offload_mode_runs_the_mlp_over_token_slices():
    model = apply_activation_checkpointing(_tiny_model(), "offload", slice_tokens=16)
    seen = []
    model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    _loss_and_grads(model)
    assert seen[:3] == [16, 16, 13]  # the forward
    assert len(seen) > 3 and max(seen) == 16  # recomputes in backward, never the whole 45-token row
