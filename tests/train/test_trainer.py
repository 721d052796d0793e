"""The trainer end to end on a tiny checkpoint and a small generated task."""

import json

import pytest
import torch
from transformers import Qwen3_5ForCausalLM

from reference import read_safetensors, tiny_model_dir
from qwen35 import Qwen35ForCausalLM
from qwen35.data.task import build_task
from qwen35.train.config_parser import load_run_config
from qwen35.train.trainer import train


def run_config(tmp_path, *flags, moe=False):
    return load_run_config(None, run_flags(tmp_path, *flags, moe=moe))


def run_flags(tmp_path, *flags, moe=False):
    """Command-line flags of a short run of a tiny model on a small task (made on first use)."""
    model_dir = tmp_path / "model"
    if not model_dir.exists():
        tiny_model_dir(model_dir, moe=moe)
        build_task(tmp_path / "task", n_train=240, n_val=16)
    base = ["--model.path", str(model_dir), "--data.train_path", str(tmp_path / "task" / "train.jsonl"),
            "--data.val_path", str(tmp_path / "task" / "val.jsonl"), "--data.seq_len", "128",
            "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "12",
            "--train.output_dir", str(tmp_path / "run"), "--train.save_steps", "0", "--train.eval_steps", "6",
            "--optim.lr", "1e-2", "--optim.warmup_steps", "2", "--log.tensorboard", "false"]
    return base + list(flags)


def losses(output_dir):
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in lines}


def test_short_run_learns_and_exports_a_checkpoint_transformers_loads(tmp_path):
    result = train(run_config(tmp_path))
    curve = losses(result.output_dir)
    assert sorted(curve) == list(range(1, 13))
    assert curve[12] < 0.7 * curve[1]
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in row for row in rows)

    export = result.export_dir
    assert (export / "tokenizer.json").is_file() and (export / "chat_template.jinja").is_file()
    ours = Qwen35ForCausalLM.from_pretrained(export).eval()
    theirs = Qwen3_5ForCausalLM.from_pretrained(export).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5


def test_resumed_run_continues_bitwise_identically(tmp_path):
    full = train(run_config(tmp_path, "--train.save_steps", "4", "--checkpoint.keep_last", "0"))
    step4 = full.output_dir / "checkpoints" / "step_00000004"
    assert step4.is_dir()
    resumed = train(run_config(tmp_path, "--train.output_dir", str(tmp_path / "resumed"),
                               "--train.resume", str(step4)))
    expected, got = losses(full.output_dir), losses(resumed.output_dir)
    assert sorted(got) == list(range(5, 13))
    assert all(got[s] == expected[s] for s in got)  # bitwise: float32 on one CPU process


def test_resume_true_picks_the_latest_complete_checkpoint_and_skips_a_partial_one(tmp_path):
    first = train(run_config(tmp_path, "--train.max_steps", "12", "--train.save_steps", "4",
                             "--checkpoint.keep_last", "2"))
    checkpoints = first.output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000008", "step_00000012"]
    (checkpoints / "step_00000016.partial").mkdir()  # what a kill during a save leaves
    again = train(run_config(tmp_path, "--train.max_steps", "14", "--train.resume", "true"))
    assert again.steps == 14
    assert max(losses(again.output_dir)) == 14


def test_tiny_moe_run_learns_and_exports_per_expert_weights(tmp_path):
    result = train(run_config(tmp_path, "--train.router_z_loss_coef", "1e-3", moe=True))
    curve = losses(result.output_dir)
    assert curve[12] < 0.7 * curve[1]
    last = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["expert_load_max"] >= 1.0 >= last["expert_load_min"] >= 0.0
    assert last["moe_aux_loss"] > 0 and last["moe_z_loss"] > 0
    theirs = __import__("transformers").Qwen3_5MoeForCausalLM.from_pretrained(result.export_dir).eval()
    ours = Qwen35ForCausalLM.from_pretrained(result.export_dir).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5


def test_tiny_moe_preset_learns_the_task_with_the_builtin_tokenizer(tmp_path):
    build_task(tmp_path / "task", n_train=240, n_val=16)
    cfg = load_run_config(None, [
        "--model.preset", "tiny-moe", "--data.train_path", str(tmp_path / "task" / "train.jsonl"),
        "--data.seq_len", "128", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
        "--train.max_steps", "10", "--train.output_dir", str(tmp_path / "run"), "--train.save_steps", "0",
        "--optim.lr", "3e-3", "--optim.warmup_steps", "2", "--log.tensorboard", "false"])
    result = train(cfg)
    curve = losses(result.output_dir)
    assert curve[10] < 0.7 * curve[1]
    config = json.loads((result.export_dir / "config.json").read_text())
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(result.export_dir)
    assert config["num_experts"] == 8 and config["vocab_size"] >= len(tokenizer)
    assert config["eos_token_id"] == tokenizer.eos_token_id  # generation stops at the built tokenizer's <|im_end|>


def test_lora_run_trains_only_the_adapter_and_merges_into_a_full_checkpoint(tmp_path):
    from peft import PeftModel

    from qwen35.cli import main

    result = train(run_config(tmp_path, "--lora.rank", "8", "--lora.alpha", "16"))
    curve = losses(result.output_dir)
    assert curve[12] < curve[1] - 0.2  # the frozen random base limits how far an adapter gets
    assert (result.export_dir / "adapter_model.safetensors").is_file()
    assert not (result.export_dir / "model.safetensors").exists()
    main(["merge", "--model", str(tmp_path / "model"), "--adapter", str(result.export_dir),
          "--output", str(tmp_path / "merged")])
    merged = Qwen35ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft = PeftModel.from_pretrained(Qwen3_5ForCausalLM.from_pretrained(tmp_path / "model"), result.export_dir).eval()
    ids = torch.randint(0, merged.config.vocab_size, (1, 25), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (peft(ids).logits - merged(ids).logits).abs().max().item() <= 1e-5


def test_qlora_run_learns_and_resumes_from_adapter_only_checkpoints(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    flags = ["--lora.rank", "8", "--lora.alpha", "16", "--lora.quantize_base", "nf4", "--train.save_steps", "6",
             "--checkpoint.keep_last", "0"]
    full = train(run_config(tmp_path, *flags))
    curve = losses(full.output_dir)
    assert curve[12] < curve[1] - 0.2
    step6 = full.output_dir / "checkpoints" / "step_00000006"
    saved = FileSystemReader(str(step6)).read_metadata().state_dict_metadata
    model_keys = {k for k in saved if k.startswith("model.")}
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)  # no base weights
    resumed = train(run_config(tmp_path, *flags, "--train.output_dir", str(tmp_path / "resumed"),
                               "--train.resume", str(step6)))
    got = losses(resumed.output_dir)
    assert sorted(got) == list(range(7, 13))
    assert all(abs(got[s] - curve[s]) <= 1e-6 * curve[s] for s in got)
    assert (resumed.export_dir / "adapter_model.safetensors").is_file()


def test_moe_qlora_run_with_4bit_experts_and_expert_adapters_learns_and_resumes(tmp_path, monkeypatch):
    from qwen35.lora.nf4_experts import NF4ExpertWeight

    quantized = []  # (expert, shape) of each expert matrix quantized while the base loads
    original = NF4ExpertWeight.quantize_expert
    monkeypatch.setattr(NF4ExpertWeight, "quantize_expert",
                        lambda self, e, w: (quantized.append((e, tuple(w.shape))), original(self, e, w)))

    flags = ["--lora.rank", "8", "--lora.alpha", "16", "--lora.quantize_base", "nf4", "--train.save_steps", "6",
             "--checkpoint.keep_last", "0", "--lora.target_modules", "[q_proj, in_proj_qkv, out_proj]",
             "--lora.target_parameters", "[mlp.experts.gate_up_proj, mlp.experts.down_proj]"]
    full = train(run_config(tmp_path, *flags, moe=True))
    layers, experts = 4, 4  # the tiny MoE checkpoint's
    assert len(quantized) == 2 * layers * experts and {e for e, _ in quantized} == set(range(experts))
    curve = losses(full.output_dir)
    assert curve[12] < curve[1] - 0.2
    resumed = train(run_config(tmp_path, *flags, "--train.output_dir", str(tmp_path / "resumed"),
                               "--train.resume", str(full.output_dir / "checkpoints" / "step_00000006"), moe=True))
    got = losses(resumed.output_dir)
    assert sorted(got) == list(range(7, 13))
    assert all(abs(got[s] - curve[s]) <= 1e-6 * curve[s] for s in got)
    from safetensors.torch import load_file

    saved = load_file(str(resumed.export_dir / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in saved  # PEFT's layout


def test_cpu_offloaded_optimizer_run_learns_with_bf16_weights_and_resumes_identically(tmp_path):
    flags = ["--optim.cpu_offload", "true", "--model.dtype", "bfloat16", "--train.save_steps", "6",
             "--checkpoint.keep_last", "0"]
    full = train(run_config(tmp_path, *flags))
    curve = losses(full.output_dir)
    assert curve[12] < 0.7 * curve[1]
    resumed = train(run_config(tmp_path, *flags, "--train.output_dir", str(tmp_path / "resumed"),
                               "--train.resume", str(full.output_dir / "checkpoints" / "step_00000006")))
    got = losses(resumed.output_dir)
    assert sorted(got) == list(range(7, 13)) and all(got[s] == curve[s] for s in got)
    exported = read_safetensors(full.export_dir)
    assert exported["model.layers.0.linear_attn.A_log"].dtype == torch.float32


@pytest.mark.parametrize("where", ["device", "cpu_offload"])
def test_optimizer_in_backward_run_has_the_plain_runs_losses_and_resumes_identically(tmp_path, where):
    one_micro_batch = ["--train.grad_clip", "0", "--train.global_batch_size", "2", "--train.eval_steps", "0"]
    plain = train(run_config(tmp_path, *one_micro_batch, "--train.output_dir", str(tmp_path / "plain")))
    flags = [*one_micro_batch, "--optim.in_backward", "true", "--optim.cpu_offload", str(where == "cpu_offload"),
             "--train.save_steps", "6", "--checkpoint.keep_last", "0"]
    full = train(run_config(tmp_path, *flags))
    rows = {name: [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
            for name, run in (("plain", plain), ("in_backward", full))}
    for a, b in zip(rows["in_backward"], rows["plain"], strict=True):  # the plain run's AdamW is torch's loop on the CPU
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"] and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"]
    curve = losses(full.output_dir)
    resumed = train(run_config(tmp_path, *flags, "--train.output_dir", str(tmp_path / "resumed"),
                               "--train.resume", str(full.output_dir / "checkpoints" / "step_00000006")))
    got = losses(resumed.output_dir)
    assert sorted(got) == list(range(7, 13)) and all(got[s] == curve[s] for s in got)


def test_offloaded_activation_checkpointing_run_has_the_plain_runs_losses(tmp_path):
    plain = losses(train(run_config(tmp_path, "--train.eval_steps", "0")).output_dir)
    offloaded = losses(train(run_config(
        tmp_path, "--train.eval_steps", "0", "--train.output_dir", str(tmp_path / "offloaded"),
        "--train.activation_checkpointing", "offload")).output_dir)
    assert sorted(offloaded) == sorted(plain)
    assert all(abs(offloaded[s] - plain[s]) <= 1e-5 * plain[s] for s in plain)
