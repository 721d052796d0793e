"""Sequence (Ulysses) and context parallelism on CPU with gloo: losses and every gradient equal
one process's.

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


def _run_worker(tmp_path, nproc: int, kind: str, degree: int, moe: bool = False, options=(), **config) -> dict:
    model_dir = tiny_model_dir(tmp_path / "model", moe=moe, **config)
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE / "sequence_worker.py"), str(model_dir), kind, str(degree), str(out), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_matches_one_process(result: dict, lora: bool = False) -> None:
    one, parallel = result["losses"]["one"], result["losses"]["parallel"]
    assert len(one) == len(parallel) == 2 and one[1] != one[0]  # the first step changed the model
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, parallel)), (one, parallel)
    errors = result["grad_errors"]
    if lora:  # only the adapters train, on the attention and GDN projections among others
        assert all(".lora_" in n for n in errors)
        assert any("linear_attn.in_proj_qkv.lora_A" in n for n in errors) and any("self_attn.k_proj.lora_B" in n for n in errors)
    else:
        assert any("linear_attn.conv1d" in n for n in errors) and any("self_attn.q_proj" in n for n in errors)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])


@pytest.mark.parametrize("kind", ["sp", "cp"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_two_ranks_per_row_match_one_process(tmp_path, kind, moe):
    _assert_matches_one_process(_run_worker(tmp_path, 2, kind, 2, moe=moe))


# Each mode of activation checkpointing, compile and adapters, under sp and cp, dense and MoE,
# always with FSDP over the ranks (none: the tests above). Offload runs its MLPs and delta rule
# in slices of 8 tokens (the worker), so the slicing happens in these short rows too.
COMBINATIONS = [
    ("sp", False, ["--ac", "offload", "--lora"]),
    ("cp", True, ["--ac", "offload", "--lora"]),
    ("sp", True, ["--ac", "selective", "--compile"]),
    ("cp", False, ["--ac", "full", "--compile"]),
    ("cp", False, ["--ac", "selective", "--lora", "--compile"]),
]


@pytest.mark.parametrize("kind, moe, options", COMBINATIONS, ids=[
    f"{k}-{'moe' if m else 'dense'}-{'-'.join(o).replace('--', '')}" for k, m, o in COMBINATIONS])
def test_checkpointing_compile_and_adapters_under_sp_and_cp_match_one_process(tmp_path, kind, moe, options):
    _assert_matches_one_process(_run_worker(tmp_path, 2, kind, 2, moe=moe, options=options), lora="--lora" in options)


def test_sp2_by_dp2_matches_one_process(tmp_path):
    _assert_matches_one_process(_run_worker(tmp_path, 4, "sp", 2))


def test_cp4_matches_one_process_with_a_document_over_whole_slices(tmp_path):
    # slices of 12 tokens; one document covers two whole slices, so the transition matrices of
    # the state passing count (with cp = 2 no slice both receives and passes on a state), and
    # attention reaches keys two ranks back. The tiny model has 2 kv heads: cp is not bounded by
    # head counts (attention gathers keys and values)
    _assert_matches_one_process(_run_worker(tmp_path, 4, "cp", 4))


def test_head_counts_that_do_not_divide_are_refused_by_sp():
    config = Qwen35Config(num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=2, linear_num_value_heads=4)
    check_heads_divide(config, 2)
    with pytest.raises(ValueError, match=r"parallel.sp = 4 .*num_key_value_heads \(2\)"):
        check_heads_divide(config, 4)


def test_sp_that_does_not_divide_the_processes_is_refused():
    with pytest.raises(ValueError, match=r"parallel.sp \(2\).*processes \(1\)"):
        Runtime.start(RunConfig(parallel=ParallelConfig(sp=2), train=TrainConfig(max_steps=1)))


def test_sp_and_cp_together_are_refused_naming_both_flags():
    with pytest.raises(ValueError, match=r"parallel.sp \(2\) and parallel.cp \(2\) together are not built"):
        Runtime.start(RunConfig(parallel=ParallelConfig(sp=2, cp=2), train=TrainConfig(max_steps=1)))
