"""The MoE model (35B-A3B family) against transformers' Qwen3_5MoeForCausalLM, tiny and float32."""

import torch
from transformers import Qwen3_5MoeForCausalLM

from reference import read_safetensors, hf_moe_model, ours_from_hf, relative_error
from qwen35 import Qwen35ForCausalLM


def test_moe_logits_loss_aux_and_every_gradient_match_transformers(tmp_path):
    hf = hf_moe_model()
    ours = ours_from_hf(hf, tmp_path)
    assert ours.config.num_experts == 4
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    theirs = hf(ids, labels=ids)
    theirs.loss.backward()
    out = ours(ids, labels=ids)
    out.loss.backward()
    assert relative_error(out.router.aux_loss.detach(), theirs.aux_loss.detach()) <= 1e-5
    assert relative_error(out.loss.detach(), theirs.loss.detach()) <= 1e-4
    hf_params = dict(hf.named_parameters())
    assert {n for n, _ in ours.named_parameters()} == set(hf_params)
    for name, param in ours.named_parameters():
        assert relative_error(param.grad, hf_params[name].grad) <= 1e-4, name


def test_moe_checkpoint_round_trip_splits_experts_as_transformers_writes_them(tmp_path):
    hf = hf_moe_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = Qwen35ForCausalLM.from_pretrained(tmp_path / "hf")
    assert ours.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 32, 32)
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=40_000)
    source, saved = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "ours")
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in saved
    assert saved.keys() == source.keys()
    assert all(torch.equal(saved[k], source[k]) and saved[k].dtype == source[k].dtype for k in source)
    back = Qwen3_5MoeForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(ids).logits - ours.eval()(ids).logits).abs().max().item() <= 1e-5


def test_a_missing_expert_is_named(tmp_path):
    hf_moe_model().save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path)
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    try:
        Qwen35ForCausalLM.from_pretrained(tmp_path)
    except ValueError as e:
        assert "missing (1): model.layers.1.mlp.experts.gate_up_proj" in str(e)
    else:
        raise AssertionError("a checkpoint without an expert loaded")


def test_router_z_loss_and_tokens_per_expert(tmp_path):
    ours = ours_from_hf(hf_moe_model(), tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    captured = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append(o[0].detach()))
             for layer in ours.model.layers]
    out = ours(ids, labels=ids)
    for h in hooks:
        h.remove()
    logits = torch.cat(captured)  # every MoE layer's router logits, [layers * 80, E]
    expected_z = torch.logsumexp(logits, dim=-1).square().mean()
    assert relative_error(out.router.z_loss.detach(), expected_z) <= 1e-6
    counts = out.router.tokens_per_expert
    assert counts.shape == (len(ours.model.layers), 4)
    assert torch.equal(counts.sum(dim=1), torch.full((len(ours.model.layers),), 80.0 * 2))  # top-2 of 80 tokens
    assert out.router.z_loss.requires_grad and not counts.requires_grad


def test_moe_presets_have_the_sizes_their_names_say():
    from qwen35 import preset

    for name, total, active in (("35B-A3B", 35e9, 3e9), ("122B-A10B", 122e9, 10e9)):
        config = preset(name)
        with torch.device("meta"):
            model = Qwen35ForCausalLM(config)
        params = dict(model.named_parameters())
        routed = sum(p.numel() for n, p in params.items() if ".experts." in n)
        all_params = sum(p.numel() for p in params.values())
        per_token = all_params - routed + routed * config.num_experts_per_tok // config.num_experts
        assert abs(all_params / total - 1) < 0.05, (name, all_params)
        assert abs(per_token / active - 1) < 0.25, (name, per_token)
