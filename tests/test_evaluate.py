"""`qwen35 eval`: loss and perplexity on any data file, exact match on the task's, full and adapter exports."""

import json
import math
import os
import subprocess
import sys

import torch
from transformers import AutoTokenizer

from reference import tiny_model_dir
from qwen35 import Qwen35ForCausalLM
from qwen35.data.dataset import build_datasets
from qwen35.data.task import build_task
from qwen35.evaluate import evaluate, load_trained
from qwen35.lora import LoraSettings, apply_lora
from qwen35.train.config import DataConfig
from qwen35.train.setup import Runtime, export_model


def _per_sample_loss(model, tokenizer, path, tmp_path):
    """The same data scored one sample per row, summed by hand: what the packed evaluation must equal."""
    rows = build_datasets(DataConfig(train_path=str(path), seq_len=2048, val_fraction=0.0,
                                     cache_dir=str(tmp_path / "cache")), tokenizer, progress=False).train
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            row = rows[i]
            bounds = row["cu_seqlens"].tolist() if "cu_seqlens" in row else [0, row["input_ids"].shape[-1]]
            ids, labels = row["input_ids"].view(-1), row["labels"].view(-1)
            for start, end in zip(bounds[:-1], bounds[1:]):
                out = model(ids[None, start:end], labels=labels[None, start:end])
                total, count = total + out.loss_sum.item(), count + int(out.num_loss_tokens)
    return total / count, count


def test_loss_and_perplexity_of_a_task_file_equal_its_samples_scored_one_by_one(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    files = build_task(tmp_path / "task", n_train=8, n_val=12)
    model = load_trained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = evaluate(model, tokenizer, files.val, seq_len=512, limit=5)
    expected_loss, expected_tokens = _per_sample_loss(model, tokenizer, files.val, tmp_path)
    assert result.loss_tokens == expected_tokens
    assert abs(result.loss - expected_loss) <= 1e-5 * expected_loss
    assert abs(result.perplexity - math.exp(expected_loss)) <= 1e-4 * result.perplexity
    assert result.exact_match is not None and 0.0 <= result.exact_match <= 1.0


def test_a_plain_chat_file_gets_loss_and_no_exact_match(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                     {"role": "assistant", "content": f"{i} {i}"}]}) + "\n"
                            for i in range(6)))
    result = evaluate(load_trained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir), data)
    assert result.exact_match is None and result.loss_tokens > 0 and math.isfinite(result.loss)


def test_an_adapter_export_records_its_base_absolutely_and_evaluates_from_any_directory(tmp_path, monkeypatch):
    base = tiny_model_dir(tmp_path / "base")
    files = build_task(tmp_path / "task", n_train=8, n_val=4)
    monkeypatch.chdir(tmp_path)
    model = Qwen35ForCausalLM.from_pretrained("base")  # a relative path, as users type it
    apply_lora(model, LoraSettings(rank=2, alpha=4, target_modules=["q_proj", "out_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # an adapter that changes the model
    export_model(model, AutoTokenizer.from_pretrained(base), tmp_path / "adapter", Runtime(torch.device("cpu"), 0, 1, None))
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(recorded) and os.path.samefile(recorded, base)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-m", "qwen35", "eval", "--model", str(tmp_path / "adapter"),
                          "--data", str(files.val), "--limit", "2"],
                         capture_output=True, text=True, cwd=elsewhere, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    adapted = evaluate(load_trained(tmp_path / "adapter").eval(), AutoTokenizer.from_pretrained(base), files.val,
                       limit=2)
    plain = evaluate(load_trained(base).eval(), AutoTokenizer.from_pretrained(base), files.val, limit=2)
    assert f"loss {adapted.loss:.4f}" in run.stdout and "exact-match accuracy" in run.stdout
    assert abs(adapted.loss - plain.loss) > 1e-3  # the adapter was applied


def test_without_data_the_model_is_scored_on_its_runs_held_out_file_from_any_directory(tmp_path, monkeypatch):
    """A LoRA run on the built-in task keeps its data in the SFT run's directory: `qwen35 eval
    --model OUT/final` reads it through the run's recorded config, relative paths and all."""
    from qwen35.train import rundir

    base = tiny_model_dir(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    files = build_task("sft/builtin/task", n_train=8, n_val=4)
    out_dir = tmp_path / "lora"
    (out_dir / "final").mkdir(parents=True)
    (out_dir / "run_config.yaml").write_text(f"data:\n  val_path: {files.val}\n")  # relative, as recorded
    (out_dir / rundir.RUN_FILE).write_text(json.dumps({"working_dir": str(tmp_path)}))
    for name in os.listdir(base):
        os.link(base / name, out_dir / "final" / name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-m", "qwen35", "eval", "--model", str(out_dir / "final"), "--limit", "2"],
                         capture_output=True, text=True, cwd=elsewhere, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"exact-match accuracy on {tmp_path / files.val}" in run.stdout
