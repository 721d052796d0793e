"""LoRA adapters: PEFT-compatible on transformers' model, merge, and only adapters train."""

import torch
from peft import PeftModel

from reference import hf_text_model, hf_vl_media_model, ours_from_hf, random_adapters, vl_media_batch
from qwen35 import Qwen35ForCausalLM, Qwen35ForConditionalGeneration
from qwen35.lora import LoraSettings, apply_lora, load_adapter, merge_lora, save_adapter
from qwen35.train.optim import build_optimizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
           "linear_attn.in_proj_a", "linear_attn.out_proj"]


def _adapted(tmp_path, use_rslora=False):
    hf = hf_text_model("untied_interval4_gqa4")
    ours = ours_from_hf(hf, tmp_path)
    apply_lora(ours, LoraSettings(rank=4, alpha=8, use_rslora=use_rslora, target_modules=TARGETS))
    with torch.no_grad():  # B starts at zero: give the adapter something to say
        for name, p in ours.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return hf, ours


def _ids():
    return torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))


def test_our_adapter_loaded_by_peft_on_transformers_gives_our_logits(tmp_path):
    for rslora in (False, True):
        hf, ours = _adapted(tmp_path / str(rslora), use_rslora=rslora)
        save_adapter(ours, tmp_path / f"adapter{rslora}")
        peft_model = PeftModel.from_pretrained(hf, tmp_path / f"adapter{rslora}").eval()
        with torch.no_grad():
            assert (peft_model(_ids()).logits - ours.eval()(_ids()).logits).abs().max().item() <= 1e-5


def test_a_vision_language_adapter_loaded_by_peft_on_transformers_gives_our_logits(tmp_path):
    """Adapters on the vision blocks (attention and MLP), the merger and the language model's
    attention: the names we write are those PEFT finds on transformers' VL model."""
    hf = hf_vl_media_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = Qwen35ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    apply_lora(ours, LoraSettings(rank=4, alpha=8, target_modules=["attn.qkv", "attn.proj", "linear_fc1",
                                                                   "linear_fc2", "q_proj", "v_proj"]))
    random_adapters(ours)
    adapted = {n.split(".lora_")[0] for n, _ in ours.named_parameters() if ".lora_A." in n}
    assert any(n.startswith("model.visual.blocks.") for n in adapted)
    assert any(n.startswith("model.visual.merger.") for n in adapted)
    assert any(n.startswith("model.language_model.") for n in adapted)
    save_adapter(ours, tmp_path / "adapter", base_model=str(tmp_path / "hf"))
    batch = vl_media_batch()
    with torch.no_grad():
        base = hf(**batch).logits
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        theirs, mine = peft_model(**batch).logits, ours(**batch).logits
    assert (theirs - base).abs().max().item() > 1e-3  # the adapters change the answer
    assert (theirs - mine).abs().max().item() <= 1e-5
    for name, _ in peft_model.named_modules():  # every adapter we wrote landed on PEFT's side
        if name.endswith(".lora_A.default"):
            adapted.discard(name.removeprefix("base_model.model.").removesuffix(".lora_A.default"))
    assert not adapted


def test_merged_checkpoint_equals_base_plus_adapter(tmp_path):
    _, ours = _adapted(tmp_path)
    save_adapter(ours, tmp_path / "adapter")
    with torch.no_grad():
        adapted = ours.eval()(_ids()).logits
    base = Qwen35ForCausalLM.from_pretrained(tmp_path / "hf_saved")
    merged = merge_lora(load_adapter(base, tmp_path / "adapter"))
    merged.save_pretrained(tmp_path / "merged")
    reloaded = Qwen35ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        assert (reloaded(_ids()).logits - adapted).abs().max().item() <= 1e-5


def test_only_adapter_parameters_get_gradients_and_optimizer_state(tmp_path):
    _, ours = _adapted(tmp_path)
    ids = _ids()
    ours(ids, labels=ids).loss.backward()
    for name, p in ours.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert (p.grad is not None) == is_adapter, name
    optimizer = build_optimizer(ours, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in ours.named_parameters() if "lora_" in n}
    assert "model.layers.0.linear_attn.in_proj_qkv.weight" in ours.state_dict()  # base keys unchanged


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _adapted_moe(tmp_path):
    from reference import hf_moe_model

    hf = hf_moe_model()
    ours = ours_from_hf(hf, tmp_path)
    apply_lora(ours, LoraSettings(rank=2, alpha=4, target_modules=["q_proj", "in_proj_qkv"], target_parameters=EXPERTS))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return hf, ours


def test_routed_expert_adapters_load_in_peft_and_merge(tmp_path):
    hf, ours = _adapted_moe(tmp_path)
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert "model.layers.0.mlp.experts.weight_adapters.gate_up_proj.lora_A.weight" in names
    save_adapter(ours, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (2 * 4, 32)
    assert saved["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].shape == (32, 2 * 4)
    ids = _ids()
    with torch.no_grad():
        adapted = ours.eval()(ids).logits
        assert (adapted - hf(ids).logits).abs().max().item() > 1e-3  # the expert adapters say something
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        assert (peft_model(ids).logits - adapted).abs().max().item() <= 1e-5
    merged = merge_lora(load_adapter(Qwen35ForCausalLM.from_pretrained(tmp_path / "hf_saved"), tmp_path / "adapter"))
    assert not any("lora" in n for n in merged.state_dict())
    with torch.no_grad():
        assert (merged.eval()(ids).logits - adapted).abs().max().item() <= 1e-5


def test_routed_expert_adapters_train_alone(tmp_path):
    _, ours = _adapted_moe(tmp_path)
    ids = _ids()
    ours(ids, labels=ids).loss.backward()
    for name, p in ours.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    grad = ours.model.layers[1].mlp.experts.weight_adapters["down_proj"].lora_A.weight.grad
    assert grad.abs().sum() > 0


def test_qlora_base_is_nf4_and_equals_its_dequantized_weights_plus_adapter(tmp_path):
    """QLoRA on the CPU (bitsandbytes' NF4 runs there too): 4-bit linear layers, adapters on top,
    the same logits as the float model holding the dequantized weights with the same adapter."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from qwen35.lora import quantize_linear_layers

    hf = hf_text_model("untied_interval4_gqa4")
    ours_from_hf(hf, tmp_path)
    qlora = quantize_linear_layers(Qwen35ForCausalLM.from_pretrained(tmp_path / "hf_saved"), torch.float32)
    plain = Qwen35ForCausalLM.from_pretrained(tmp_path / "hf_saved")
    quantized = {n: m for n, m in qlora.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert "model.layers.0.linear_attn.in_proj_qkv" in quantized and "model.layers.3.self_attn.q_proj" in quantized
    assert not isinstance(qlora.lm_head, bnb.nn.Linear4bit)
    assert qlora.model.layers[0].linear_attn.A_log.dtype == torch.float32
    with torch.no_grad():
        for name, module in quantized.items():
            assert module.weight.dtype == torch.uint8
            plain.get_submodule(name).weight.copy_(dequantize_4bit(module.weight.data, module.weight.quant_state))
    settings = LoraSettings(rank=4, alpha=8, target_modules=TARGETS)
    for model in (qlora, plain):
        apply_lora(model, settings)
        random_adapters(model)
    ids = _ids()
    out = qlora(ids, labels=ids)
    with torch.no_grad():
        assert (qlora(ids).logits - plain(ids).logits).abs().max().item() <= 1e-5
    out.loss.backward()
    trained = {n for n, p in qlora.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in qlora.named_parameters() if "lora_" in n}


def test_expert_adapters_refuse_dropout_as_peft_does(tmp_path):
    import pytest
    from reference import hf_moe_model

    ours = ours_from_hf(hf_moe_model(), tmp_path)
    with pytest.raises(ValueError, match="lora.dropout must be 0"):
        apply_lora(ours, LoraSettings(rank=2, alpha=4, dropout=0.1, target_parameters=EXPERTS))
