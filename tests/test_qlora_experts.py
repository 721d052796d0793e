"""QLoRA's 4-bit routed experts: bitsandbytes' NF4 per expert, dequantized on use, loaded expert
by expert; the 4-bit model trains its adapters exactly as the float model holding the
dequantized weights does (bitsandbytes runs NF4 on the CPU)."""

import pytest
import torch

from reference import copy_dequantized, hf_moe_model, ours_from_hf, random_adapters
from qwen35 import Qwen35ForCausalLM, ops
from qwen35.checkpoint.hf import load_weights, read_model_config
from qwen35.lora import LoraSettings, QuantizedExperts, apply_lora, quantize_experts, quantize_linear_layers
from qwen35.lora.nf4_experts import NF4ExpertWeight
from qwen35.model.moe import Experts
from qwen35.ops.moe import expert_loop, grouped_experts

bnb = pytest.importorskip("bitsandbytes")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "in_proj_qkv", "out_proj"]


def _weights(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def _quantized(weights):
    stored = NF4ExpertWeight(weights.shape)
    for e in range(weights.shape[0]):
        stored.quantize_expert(e, weights[e])
    return stored


def test_stacked_dequantization_equals_bitsandbytes_per_expert():
    # 192 x 128 per expert: 384 NF4 blocks, so the last 256-block of scales is partial
    weights = _weights((5, 192, 128))
    stored = _quantized(weights)
    whole = stored.dequantize(torch.float32)
    assert whole.shape == weights.shape
    for e in range(5):
        codes, state = bnb.functional.quantize_4bit(weights[e].contiguous(), blocksize=64, compress_statistics=True,
                                                    quant_type="nf4")
        assert torch.equal(whole[e], bnb.functional.dequantize_4bit(codes, state))
    assert torch.equal(stored.dequantize(torch.float32, slice(1, 4)), whole[1:4])  # a chunk of experts
    error = (whole - weights).norm() / weights.norm()
    assert 0.01 < error < 0.15  # quantized (not a copy), and NF4-close
    assert stored.codes.numel() + stored.scales.numel() < weights.numel()  # under a byte per weight


def test_checkpoint_pieces_quantize_each_expert_once_all_its_rows_are_read():
    weights = _weights((3, 32, 64), seed=1)
    whole = _quantized(weights)
    pieces = NF4ExpertWeight(weights.shape)
    for e in range(3):  # the gate and up halves of gate_up_proj, stored apart
        pieces.load_piece((e, slice(0, 16)), weights[e, :16])
        assert e in pieces._pending  # half an expert waits
        pieces.load_piece((e, slice(16, 32)), weights[e, 16:])
        assert not pieces._pending
    fused = NF4ExpertWeight(weights.shape)
    fused.load_piece((), weights)
    for other in (pieces, fused):
        assert torch.equal(other.dequantize(torch.float32), whole.dequantize(torch.float32))


def _pair(tmp_path):
    """(QLoRA model with 4-bit experts and linear layers, float model holding their dequantized
    weights), the same adapters on both, B non-zero."""
    ours_from_hf(hf_moe_model(), tmp_path)
    qlora = Qwen35ForCausalLM.from_pretrained(tmp_path / "hf_saved")
    plain = Qwen35ForCausalLM.from_pretrained(tmp_path / "hf_saved")
    quantize_linear_layers(quantize_experts(qlora), torch.float32)
    copy_dequantized(qlora, plain, torch.float32)
    settings = LoraSettings(rank=2, alpha=4, target_modules=ATTENTION, target_parameters=EXPERTS)
    for model in (qlora, plain):
        apply_lora(model, settings)
        random_adapters(model)
    return qlora, plain


@pytest.mark.parametrize("experts_op", [expert_loop, grouped_experts], ids=["loop", "grouped"])
def test_4bit_expert_model_has_the_loss_and_adapter_gradients_of_its_dequantized_weights(tmp_path, experts_op,
                                                                                       monkeypatch):
    monkeypatch.setitem(ops._active, "routed_experts", experts_op)
    qlora, plain = _pair(tmp_path)
    experts = qlora.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, NF4ExpertWeight) and experts.gate_up_proj.codes.dtype == torch.uint8
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n, _ in qlora.named_parameters())
    ids = torch.randint(0, qlora.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    losses = {}
    for label, model in (("qlora", qlora), ("plain", plain)):
        out = model(ids, labels=ids)
        out.loss.backward()
        losses[label] = out.loss.detach()
    torch.testing.assert_close(losses["qlora"], losses["plain"], rtol=1e-6, atol=0)
    trained = {n: p for n, p in qlora.named_parameters() if p.grad is not None}
    assert set(trained) == {n for n, _ in qlora.named_parameters() if "lora_" in n}
    assert all(not b.requires_grad for b in qlora.buffers())
    assert "model.layers.1.mlp.experts.weight_adapters.down_proj.lora_B.weight" in trained
    reference = dict(plain.named_parameters())
    for name, p in trained.items():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, reference[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_qlora_base_loads_its_experts_from_a_checkpoint_expert_by_expert(tmp_path, monkeypatch):
    ours_from_hf(hf_moe_model(), tmp_path)  # transformers writes gate, up and down per expert
    with torch.device("meta"):
        model = Qwen35ForCausalLM(read_model_config(tmp_path / "hf_saved"))
    quantize_experts(model)
    model.to_empty(device="cpu")
    quantized_one = []
    original = NF4ExpertWeight.quantize_expert
    monkeypatch.setattr(NF4ExpertWeight, "quantize_expert",
                        lambda self, e, w: (quantized_one.append(tuple(w.shape)), original(self, e, w)))
    load_weights(model, tmp_path / "hf_saved")
    config = model.config
    layers, experts = config.num_hidden_layers, config.num_experts
    assert len(quantized_one) == 2 * layers * experts  # one call per expert and weight, never a layer at once
    assert set(quantized_one) == {(2 * config.moe_intermediate_size, config.hidden_size),
                                  (config.hidden_size, config.moe_intermediate_size)}
    monkeypatch.undo()
    expected = quantize_experts(Qwen35ForCausalLM.from_pretrained(tmp_path / "hf_saved"))
    for name, buffer in expected.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name
    assert isinstance(model.model.layers[0].mlp.experts, QuantizedExperts)
    assert not isinstance(model.model.layers[0].mlp.experts, Experts)
