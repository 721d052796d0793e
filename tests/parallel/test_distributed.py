"""Distributed and durable training on CPU with gloo: FSDP2 vs one process, resume, crashes,
sharded loading. Each test launches the real `qwen35 train` through torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.data.task import build_task
from reference import read_safetensors, tiny_model_dir

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
    _ok(_launch(_flags(tmp_path, "two", 20, "--checkpoint.export_final", "true"), nproc=2))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 21))
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5
    assert one[20] < one[1]
    norms_one, norms_two = _losses(tmp_path / "one", "grad_norm"), _losses(tmp_path / "two", "grad_norm")
    assert max(abs(norms_one[s] - norms_two[s]) / norms_one[s] for s in one) <= 1e-4  # the same gradient

    # `qwen35 export` reads the two ranks' sharded checkpoint in one process: the run's own export
    export = subprocess.run([sys.executable, "-m", "qwen35", "export", "--checkpoint", str(tmp_path / "two"),
                             "--output", str(tmp_path / "exported")], capture_output=True, text=True, timeout=600)
    _ok(export)
    exported, final = read_safetensors(tmp_path / "exported"), read_safetensors(tmp_path / "two" / "final")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


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


def _assert_same_moe_run(one_dir, two_dir):
    one, two = _losses(one_dir), _losses(two_dir)
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5
    norms_one, norms_two = _losses(one_dir, "grad_norm"), _losses(two_dir, "grad_norm")
    assert max(abs(norms_one[s] - norms_two[s]) / norms_one[s] for s in one) <= 1e-4
    aux_one, aux_two = _losses(one_dir, "moe_aux_loss"), _losses(two_dir, "moe_aux_loss")
    assert max(abs(aux_one[s] - aux_two[s]) for s in one) <= 1e-6


def test_moe_fsdp_matches_one_process_and_shards_the_experts_along_the_expert_dimension(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    # Router losses on, per micro-batch (the default): rank r's micro-batch holds the rows that
    # one process with the same micro_batch_size runs as its r-th micro-batch of the step.
    tiny_model_dir(tmp_path / "model", moe=True, router_aux_loss_coef=0.1)  # 4 experts
    build_task(tmp_path / "task", n_train=400, n_val=8)
    extra = ["--train.save_steps", "8", "--train.router_z_loss_coef", "1e-3"]
    _ok(_launch(_flags(tmp_path, "one", 8, *extra), nproc=1))
    _ok(_launch(_flags(tmp_path, "two", 8, *extra), nproc=2))
    _assert_same_moe_run(tmp_path / "one", tmp_path / "two")
    # Expert parallelism over the checkpoint: each rank reads its two experts' tensors.
    _ok(_launch(_flags(tmp_path, "ep2", 8, *extra, "--parallel.ep", "2"), nproc=2))
    _assert_same_moe_run(tmp_path / "one", tmp_path / "ep2")
    saved = FileSystemReader(str(tmp_path / "two" / "checkpoints" / "step_00000008")).read_metadata()
    chunks = saved.state_dict_metadata["model.model.layers.0.mlp.experts.gate_up_proj"].chunks
    assert sorted((c.offsets[0], c.sizes[0]) for c in chunks) == [(0, 2), (2, 2)]  # two experts per rank


def test_moe_global_balance_over_the_step_on_two_processes_equals_one_process(tmp_path):
    """The step's f_e over every micro-batch and rank: 2 ranks x 1 micro-batch equal 1 rank x 2."""
    tiny_model_dir(tmp_path / "model", moe=True, router_aux_loss_coef=0.1)
    build_task(tmp_path / "task", n_train=400, n_val=8)
    extra = ["--train.router_balance", "global", "--train.router_z_loss_coef", "1e-3"]
    _ok(_launch(_flags(tmp_path, "one", 6, *extra), nproc=1))
    _ok(_launch(_flags(tmp_path, "two", 6, *extra), nproc=2))
    _assert_same_moe_run(tmp_path / "one", tmp_path / "two")


def _tiny_moe_flags(tmp_path, out, steps, *extra):
    if not (tmp_path / "task").exists():
        build_task(tmp_path / "task", n_train=400, n_val=8)
    return ["--model.preset", "tiny-moe", "--data.train_path", str(tmp_path / "task" / "train.jsonl"),
            "--data.seq_len", "128", "--train.global_batch_size", "8", "--train.micro_batch_size", "2",
            "--train.max_steps", str(steps), "--train.output_dir", str(tmp_path / out), "--train.save_steps", "0",
            "--optim.lr", "3e-3", "--log.tensorboard", "false", "--checkpoint.export_final", "false",
            "--train.log_steps", "1", "--train.eval_steps", "0", "--checkpoint.keep_last", "0",
            "--train.router_z_loss_coef", "1e-3", *extra]


@pytest.fixture(scope="module")
def one_process_moe_gradients(tmp_path_factory):
    return _step_gradients(tmp_path_factory.mktemp("one"), "grads_one", 1)


def _step_gradients(tmp_path, name, nproc, *extra):
    out = tmp_path / f"{name}.pt"
    _ok(_launch([str(out), *_tiny_moe_flags(tmp_path, name, 1, *extra)], nproc=nproc,
                script=HERE / "step_gradients.py"))
    return torch.load(out)


def _assert_same_gradients(one, other):
    assert abs(one["loss"].item() - other["loss"].item()) <= 1e-6
    assert one["grads"].keys() == other["grads"].keys()
    whole = torch.cat([g.flatten() for g in one["grads"].values()])
    assert (torch.cat([other["grads"][n].flatten() for n in one["grads"]]) - whole).norm() <= 1e-5 * whole.norm()
    for name, grad in one["grads"].items():
        # each parameter to 1e-5 of its own norm, or of 1e-3 of the whole gradient's where its
        # own is tiny (a gradient 1e-6 of the whole differs in float32 summation order alone)
        scale = max(grad.norm().item(), 1e-3 * whole.norm().item())
        assert (other["grads"][name] - grad).norm().item() <= 1e-5 * scale, name


def test_expert_parallel_on_two_processes_equals_one_process(tmp_path, one_process_moe_gradients):
    """ep=2: each rank holds 4 of the 8 experts; losses step by step (router losses on), the
    gradient of a step, and the checkpoint holding each rank's experts, which resumes without ep."""
    from torch.distributed.checkpoint import FileSystemReader

    _ok(_launch(_tiny_moe_flags(tmp_path, "one", 6), nproc=1))
    _ok(_launch(_tiny_moe_flags(tmp_path, "ep2", 6, "--parallel.ep", "2", "--train.save_steps", "3"), nproc=2))
    one, ep2 = _losses(tmp_path / "one"), _losses(tmp_path / "ep2")
    assert sorted(one) == sorted(ep2) == list(range(1, 7))
    # to 1e-5 of the loss: the two layouts sum in different orders, and after a few steps a
    # top-2 routing near-tie can follow that rounding (step 5 of 6 once differed by 1.9e-5 of
    # 3.46, here and in the run resumed from ep=2's step 3)
    assert max(abs(one[s] - ep2[s]) / abs(one[s]) for s in one) <= 1e-5
    assert one[6] < one[1]
    saved = FileSystemReader(str(tmp_path / "ep2" / "checkpoints" / "step_00000006")).read_metadata()
    chunks = saved.state_dict_metadata["model.model.layers.0.mlp.experts.gate_up_proj"].chunks
    assert sorted((c.offsets[0], c.sizes[0]) for c in chunks) == [(0, 4), (4, 4)]
    step3 = tmp_path / "ep2" / "checkpoints" / "step_00000003"  # resumed without ep, on one process
    _ok(_launch(_tiny_moe_flags(tmp_path, "resumed", 6, "--train.resume", str(step3)), nproc=1))
    resumed = _losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6] and max(abs(one[s] - resumed[s]) / abs(one[s]) for s in resumed) <= 1e-5
    _assert_same_gradients(one_process_moe_gradients, _step_gradients(tmp_path, "grads_ep2", 2, "--parallel.ep", "2"))


def test_expert_parallel_times_data_parallel_on_four_processes_equals_one_process(tmp_path, one_process_moe_gradients):
    """ep=2 x dp_mod_ep=2: experts split over pairs of ranks and sharded by FSDP across the pairs."""
    _assert_same_gradients(one_process_moe_gradients, _step_gradients(tmp_path, "grads_ep2dp2", 4, "--parallel.ep", "2"))


def test_lora_with_fsdp_and_activation_checkpointing_matches_one_process(tmp_path):
    lora = ["--lora.rank", "4", "--lora.alpha", "8", "--train.activation_checkpointing", "full"]
    _ok(_launch(_flags(tmp_path, "one", 8, *lora), nproc=1))
    _ok(_launch(_flags(tmp_path, "two", 8, *lora), nproc=2))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5
    assert one[8] < one[1]


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (torchrun starts its workers as child processes)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


def test_sigterm_to_one_rank_stops_both_at_one_checkpoint_and_resumes_on_two_and_one_process(tmp_path):
    # A constant learning rate, so that the resumed runs may end at another max_steps than the
    # stopped one and still take the same steps.
    flags = ["--optim.scheduler", "constant", "--optim.warmup_steps", "0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "qwen35",
           "train", *_flags(tmp_path, "run", 1000, *flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # mid-training
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(_worker_pid(launcher, rank=1), signal.SIGTERM)  # rank 0 must stop with it
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode != 0 and "exitcode  : 143" in output, output[-3000:]
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert len(saved) == 1 and not saved[0].endswith(".partial"), saved  # exactly one, complete
    stopped_at = int(saved[0].removeprefix("step_"))
    assert 2 <= stopped_at < 1000 and not (tmp_path / "run" / "final").exists()

    end = stopped_at + 2
    # First 2 -> 1 (given the output directory: its latest checkpoint), then 2 -> 2 in place.
    _ok(_launch(_flags(tmp_path, "one", end, *flags, "--train.resume", str(tmp_path / "run")), nproc=1))
    _ok(_launch(_flags(tmp_path, "run", end, *flags, "--train.resume", "true"), nproc=2))
    _ok(_launch(_flags(tmp_path, "uninterrupted", end, *flags), nproc=2))
    two_then_two, two_then_one = _losses(tmp_path / "run"), _losses(tmp_path / "one")
    uninterrupted = _losses(tmp_path / "uninterrupted")
    assert sorted(two_then_two) == list(range(1, end + 1)) and sorted(two_then_one) == [end - 1, end]
    assert all(two_then_two[s] == uninterrupted[s] for s in uninterrupted)  # same process count: bitwise
    assert max(abs(two_then_one[s] - uninterrupted[s]) for s in two_then_one) <= 1e-6


def test_builtin_run_with_sequence_and_context_parallelism_logs_the_losses_of_one_process(tmp_path):
    """The issue's commands, each in its own output directory: `torchrun --nproc-per-node 2 -m
    qwen35 train --parallel.sp 2 --train.max_steps 6 --train.log_steps 1` (the built-in default:
    the tiny preset on the generated task, rows of 512 tokens) and the same with `--parallel.cp 2`,
    against one process."""
    def run(name, nproc, *extra):
        flags = ["--train.max_steps", "6", "--train.log_steps", "1", "--train.output_dir", str(tmp_path / name),
                 "--checkpoint.export_final", "false"]  # no export, so no evaluation of it: the test's time
        _ok(_launch([*extra, *flags], nproc=nproc))
        return _losses(tmp_path / name), _losses(tmp_path / name, "grad_norm")

    one, norms_one = run("one", 1)
    assert sorted(one) == list(range(1, 7)) and one[6] < one[1]
    for kind in ("sp", "cp"):
        two, norms_two = run(kind, 2, f"--parallel.{kind}", "2")
        assert sorted(two) == list(range(1, 7)), kind
        assert max(abs(one[s] - two[s]) for s in one) <= 1e-4, (kind, one, two)
        assert max(abs(norms_one[s] - norms_two[s]) / norms_one[s] for s in one) <= 1e-4, kind


def test_the_built_in_default_run_on_two_processes_trains_exports_once_and_prints_one_accuracy(tmp_path):
    """`torchrun --nproc-per-node 2 -m qwen35 train` with no model or data of its own: the micro-batch
    fits the two ranks, rank 0 writes final/ and alone evaluates it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "qwen35",
           "train", "--train.max_steps", "2", "--train.save_steps", "0", "--train.eval_steps", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    _ok(proc)
    assert proc.stdout.count("held-out exact match: untrained") == 1, proc.stdout[-2000:]
    final = tmp_path / "outputs" / "default" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert "micro_batch_size: 4" in (final.parent / "run_config.yaml").read_text()
