"""GRPO under torchrun with gloo on the CPU: FSDP2 over 2 processes against 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from reference import tiny_model_dir
from test_run import prompt_file

HERE = Path(__file__).parent


def _torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), str(HERE)])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_process_update_equals_one_process(tmp_path):
    """The same groups, split over 2 FSDP ranks (which also run different numbers of micro-batches)
    or all on 1: the same step loss, clip fraction and gradient of every parameter."""
    model = tiny_model_dir(tmp_path / "model")
    for nproc in (1, 2):
        _torchrun(nproc, str(HERE / "grpo_update_worker.py"), str(tmp_path / f"{nproc}.pt"), "--model.path", str(model))
    one, two = (torch.load(tmp_path / f"{n}.pt") for n in (1, 2))
    assert one["metrics"]["updates"] == two["metrics"]["updates"] == 1
    assert one["metrics"]["clip_fraction"] > 0  # the shifted π_old makes some ratios clip
    for key in ("policy_loss", "clip_fraction", "entropy", "grad_norm"):
        assert abs(one["metrics"][key] - two["metrics"][key]) <= 1e-5 * max(1.0, abs(one["metrics"][key])), key
    assert one["delta"].keys() == two["delta"].keys()
    for name, delta in one["delta"].items():
        torch.testing.assert_close(two["delta"][name], delta, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(float(d.abs().sum()) for d in one["delta"].values()) > 0


def test_lora_policy_under_two_processes_trains_only_adapters(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    _torchrun(2, str(HERE / "grpo_update_worker.py"), str(tmp_path / "lora.pt"), "--model.path", str(model),
              "--lora.rank", "4")
    out = torch.load(tmp_path / "lora.pt")
    assert out["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in out["trainable"])
    moved = {n for n, d in out["delta"].items() if d.abs().max() > 0}
    assert moved and moved <= set(out["trainable"])  # the base did not move
    assert any(".lora_B." in n for n in moved)


def test_rl_command_runs_under_two_processes(tmp_path):
    """The whole run under FSDP: rollouts with the model gathered, sharded updates, evaluation,
    a checkpoint and the export, without a hang."""
    model = tiny_model_dir(tmp_path / "model")
    prompts = prompt_file(tmp_path / "prompts.jsonl", 8)
    out = tmp_path / "run"
    _torchrun(2, "-m", "qwen35", "rl", "--model.path", str(model), "--data.train_path", str(prompts),
              "--eval.path", str(prompts), "--eval.limit", "3", "--eval.max_response_length", "4",
              "--grpo.reward", "toy_rewards:short", "--rollout.n_samples_per_prompt", "3",
              "--rollout.max_response_length", "5", "--train.prompts_per_step", "4", "--train.max_steps", "2",
              "--grpo.dynamic_sampling", "--grpo.micro_batch_size", "2", "--optim.lr", "1e-3",
              "--train.output_dir", str(out), "--log.tensorboard", "false")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2]
    assert [r["step"] for r in rows if "eval_pass@1" in r] == [0, 2]
    assert all(r["updates"] == 1 and r["groups_kept"] + r["groups_dropped"] >= 4 for r in rows if "reward_mean" in r)
    assert (out / "checkpoints" / "step_00000002").is_dir() and (out / "final" / "config.json").is_file()
