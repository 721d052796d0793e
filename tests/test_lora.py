"""LoRA adapters: PEFT-compatible on transformers' model, merge, and only adapters train."""

import torch
from peft import PeftModel

from reference import hf_text_model, ours_from_hf
from qwen35 import Qwen35ForCausalLM
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
