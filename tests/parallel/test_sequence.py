"""Ulysses sequence parallelism on CPU with gloo: losses and every gradient equal one process's.

Each test launches `sequence_worker.py` under torchrun; the worker runs the same two optimizer
steps alone and in parallel (FSDP over all ranks) on packed rows whose documents straddle the
ranks' slices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen35 import Qwen35Config
from qwen35.parallel.sequence import check_heads_divide
from qwen35.train.config import ParallelConfig, RunConfig, TrainConfig
from qwen35.train.setup import Runtime
from reference import tiny_model_dir

HERE = Path(__file__).parent


def _run_worker(tmp_path, nproc: int, sp: int, moe: bool = False) -> dict:
    model_dir = tiny_model_dir(tmp_path / "model", moe=moe)
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE / "sequence_worker.py"), str(model_dir), str(sp), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_matches_one_process(result: dict) -> None:
    one, parallel = result["losses"]["one"], result["losses"]["parallel"]
    assert len(one) == len(parallel) == 2 and one[1] != one[0]  # the first step changed the model
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, parallel)), (one, parallel)
    errors = result["grad_errors"]
    assert any("linear_attn.conv1d" in n for n in errors) and any("self_attn.q_proj" in n for n in errors)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_sp2_matches_one_process(tmp_path, moe):
    _assert_matches_one_process(_run_worker(tmp_path, nproc=2, sp=2, moe=moe))


def test_sp2_by_dp2_matches_one_process(tmp_path):
    _assert_matches_one_process(_run_worker(tmp_path, nproc=4, sp=2))


def test_head_counts_that_do_not_divide_are_refused():
    config = Qwen35Config(num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=4)
    check_heads_divide(config, 2)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        check_heads_divide(config, 4)


def test_sp_that_does_not_divide_the_processes_is_refused():
    with pytest.raises(ValueError, match=r"parallel.sp \(2\).*processes \(1\)"):
        Runtime.start(RunConfig(parallel=ParallelConfig(sp=2), train=TrainConfig(max_steps=1)))
