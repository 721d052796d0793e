"""Distributed and durable training on CPU with gloo: FSDP2 vs one process, resume, crashes,
sharded loading. Each test launches the real `qwen35 train` through torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.data.task import build_task
from reference import tiny_model_dir

HERE = Path(__file__).parent


def _launch(args, nproc=1, script=None):
    entry = ["-m", "qwen35"] if script is None else [str(script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *entry]
    if script is None:
        cmd.append("train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    return subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=600)


def _flags(tmp_path, out, steps=20, *extra):
    if not (tmp_path / "model").exists():
        tiny_model_dir(tmp_path / "model")
        build_task(tmp_path / "task", n_train=400, n_val=8)
    return ["--model.path", str(tmp_path / "model"), "--data.train_path", str(tmp_path / "task" / "train.jsonl"),
            "--data.seq_len", "128", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
            "--train.max_steps", str(steps), "--train.output_dir", str(tmp_path / out),
            "--train.save_steps", "0", "--optim.lr", "3e-3", "--log.tensorboard", "false",
            "--checkpoint.export_final", "false", "--train.log_steps", "1", "--train.eval_steps", "0",
            "--checkpoint.keep_last", "0", *extra]


def _losses(directory, key="loss"):
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows}


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_fsdp_matches_one_process_step_by_step(tmp_path):
    _ok(_launch(_flags(tmp_path, "one"), nproc=1))
    _ok(_launch(_flags(tmp_path, "two"), nproc=2))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 21))
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5
    assert one[20] < one[1]
    norms_one, norms_two = _losses(tmp_path / "one", "grad_norm"), _losses(tmp_path / "two", "grad_norm")
    assert max(abs(norms_one[s] - norms_two[s]) / norms_one[s] for s in one) <= 1e-4  # the same gradient


def test_resume_on_a_different_world_size(tmp_path):
    _ok(_launch(_flags(tmp_path, "full", 12, "--train.save_steps", "4"), nproc=1))
    step4 = tmp_path / "full" / "checkpoints" / "step_00000004"
    _ok(_launch(_flags(tmp_path, "resumed", 12, "--train.resume", str(step4)), nproc=2))
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(5, 13))
    assert max(abs(full[s] - resumed[s]) for s in resumed) <= 1e-6


def test_kill_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    flags = _flags(tmp_path, "run", 9, "--train.save_steps", "3")
    crashed = _launch(flags, nproc=1, script=HERE / "crash_during_save.py")
    assert crashed.returncode != 0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003", "step_00000006.partial"]
    _ok(_launch(flags + ["--train.resume", "true"], nproc=1))
    assert "resumed from" in _launch(flags + ["--train.resume", "true", "--train.max_steps", "10"]).stdout
    _ok(_launch(_flags(tmp_path, "uninterrupted", 9), nproc=1))
    resumed, uninterrupted = _losses(tmp_path / "run"), _losses(tmp_path / "uninterrupted")
    assert all(resumed[s] == uninterrupted[s] for s in range(4, 10))  # later lines win after the crash


def test_sharded_loading_keeps_each_rank_well_below_the_model_size(tmp_path):
    config = Qwen35Config(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=128, linear_key_head_dim=64,
                          linear_value_head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8)
    model = Qwen35ForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "big", max_shard_bytes=16 * 2**20)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    _ok(_launch([str(tmp_path / "big"), str(tmp_path / "rank{rank}.json")], nproc=2,
                script=HERE / "measure_sharded_load.py"))
    for rank in range(2):
        growth = json.loads((tmp_path / f"rank{rank}.json").read_text())["growth"]
        # Each rank owns half the weights; the rest is one file's mapped pages and a slice in flight
        # (one process loading everything grows by about 1.3x the model).
        assert growth < 0.7 * size, (rank, growth / 2**20, size / 2**20)


def test_moe_fsdp_matches_one_process_and_shards_the_experts_along_the_expert_dimension(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    # Without router losses: they are per-micro-batch terms (as in transformers), and each rank
    # packs its own documents into rows, so 1 and 2 processes balance over different rows.
    tiny_model_dir(tmp_path / "model", moe=True, router_aux_loss_coef=0.0)  # 4 experts
    build_task(tmp_path / "task", n_train=400, n_val=8)
    extra = ["--train.save_steps", "8"]
    _ok(_launch(_flags(tmp_path, "one", 8, *extra), nproc=1))
    _ok(_launch(_flags(tmp_path, "two", 8, *extra), nproc=2))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5
    norms_one, norms_two = _losses(tmp_path / "one", "grad_norm"), _losses(tmp_path / "two", "grad_norm")
    assert max(abs(norms_one[s] - norms_two[s]) / norms_one[s] for s in one) <= 1e-4
    saved = FileSystemReader(str(tmp_path / "two" / "checkpoints" / "step_00000008")).read_metadata()
    chunks = saved.state_dict_metadata["model.model.layers.0.mlp.experts.gate_up_proj"].chunks
    assert sorted((c.offsets[0], c.sizes[0]) for c in chunks) == [(0, 2), (2, 2)]  # two experts per rank


def test_lora_with_fsdp_and_activation_checkpointing_matches_one_process(tmp_path):
    lora = ["--lora.rank", "4", "--lora.alpha", "8", "--train.activation_checkpointing", "true"]
    _ok(_launch(_flags(tmp_path, "one", 8, *lora), nproc=1))
    _ok(_launch(_flags(tmp_path, "two", 8, *lora), nproc=2))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5
    assert one[8] < one[1]


def test_sequence_and_context_parallel_training_match_one_process(tmp_path):
    _ok(_launch(_flags(tmp_path, "one", 6), nproc=1))
    one, norms_one = _losses(tmp_path / "one"), _losses(tmp_path / "one", "grad_norm")
    for kind in ("sp", "cp"):
        _ok(_launch(_flags(tmp_path, kind, 6, f"--parallel.{kind}", "2"), nproc=2))
        two, norms_two = _losses(tmp_path / kind), _losses(tmp_path / kind, "grad_norm")
        assert sorted(one) == sorted(two) == list(range(1, 7))
        assert max(abs(one[s] - two[s]) for s in one) <= 1e-5, kind
        assert max(abs(norms_one[s] - norms_two[s]) / norms_one[s] for s in one) <= 1e-5, kind
