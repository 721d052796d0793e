"""`qwen35 train`: which settings a run starts from, and a run without a model stops at once."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen35.cli import train_config
from qwen35.train.config import OptimConfig, TrainConfig

ROOT = Path(__file__).parent.parent


def test_no_arguments_is_the_built_in_default_run_on_the_tiny_preset():
    cfg = train_config(["--train.max_steps", "30"])
    assert cfg.model.preset == "tiny" and cfg.model.path is None
    assert cfg.optim.lr != OptimConfig().lr and cfg.train.output_dir != TrainConfig().output_dir
    assert cfg.train.max_steps == 30


def test_flags_are_checked_against_the_built_in_runs_settings_not_the_plain_defaults():
    # valid with the built-in run's one micro-batch of 8 rows per step, not with the plain
    # defaults' micro-batches of 1
    cfg = train_config(["--optim.in_backward", "true", "--train.grad_clip", "0"])
    assert cfg.model.preset == "tiny" and cfg.optim.in_backward
    assert cfg.train.global_batch_size == cfg.train.micro_batch_size == 8


def test_a_run_with_its_own_model_and_data_starts_from_the_documented_defaults(tmp_path):
    cfg = train_config(["--model.path", str(tmp_path), "--data.train_path", str(tmp_path / "train.jsonl")])
    assert cfg.model.preset is None
    assert cfg.optim == OptimConfig() and cfg.train == TrainConfig()


@pytest.mark.parametrize("flags, names", [
    (["--model.path", ""], ["model.path"]),
    (["--data.train_path", "x.jsonl"], ["model.path", "model.preset"]),
])
def test_a_run_without_a_model_exits_at_once_naming_what_to_set(tmp_path, flags, names):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qwen35", "train", *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2  # a user error: one message, no traceback
    assert all(name in proc.stderr for name in names) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()  # nothing built, nothing trained
    assert elapsed < 300  # seconds on an idle machine; the bound leaves room for a busy one
