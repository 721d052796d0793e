"""Runs that stop cleanly: signals, non-finite steps, damaged checkpoints, and what the command
prints and returns for each (one process; tests/parallel has the multi-process side)."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from qwen35.cli import main
from qwen35.errors import EXIT_DIVERGED, EXIT_SIGTERM, TrainingDiverged, UserError
from qwen35.train import trainer
from qwen35.train.guards import weights_are_finite
from qwen35.train.trainer import train
from test_trainer import losses, run_config, run_flags

FAST = ["--train.eval_steps", "0", "--checkpoint.export_final", "false"]


def on_step(monkeypatch, steps, action):
    """Runs `action(model)` right after the forward and backward of the given (1-based) steps."""
    real, calls = trainer.forward_backward, []

    def wrapped(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        calls.append(1)
        if len(calls) in steps:
            action(model, result)
        return result

    monkeypatch.setattr(trainer, "forward_backward", wrapped)


def test_sigterm_writes_one_checkpoint_exits_143_and_the_resumed_run_is_bitwise_the_same(tmp_path, monkeypatch):
    flags = run_flags(tmp_path, *FAST, "--train.max_steps", "6", "--train.save_steps", "0", "--train.log_steps", "1")
    on_step(monkeypatch, {4}, lambda model, result: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        main(["train", *flags])
    assert stopped.value.code == EXIT_SIGTERM
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]
    assert not (run / "final").exists()
    monkeypatch.undo()
    main(["train", *flags, "--train.resume", "true"])  # returns: exit code 0
    main(["train", *flags, "--train.output_dir", str(tmp_path / "uninterrupted")])
    got, expected = losses(run), losses(tmp_path / "uninterrupted")
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    assert all(got[s] == expected[s] for s in expected)  # bitwise, also the steps after the resume


def test_non_finite_steps_are_skipped_counted_and_leave_the_weights_alone(tmp_path, monkeypatch):
    before = {}

    def poison(model, result):
        before.update({n: p.detach().clone() for n, p in model.named_parameters()})
        next(p for p in model.parameters() if p.grad is not None).grad.fill_(math.nan)

    on_step(monkeypatch, {3, 4}, poison)
    result = train(run_config(tmp_path, "--train.eval_steps", "0"))
    assert result.skipped_steps == 2 and result.steps == 12
    rows = losses(result.output_dir)
    assert math.isfinite(rows[12]) and rows[12] < rows[1]
    last = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_steps"] == 2
    assert (result.export_dir / "model.safetensors").is_file()


def test_k_non_finite_steps_in_a_row_stop_the_run_naming_the_steps_and_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                          capsys):
    on_step(monkeypatch, set(range(3, 13)), lambda model, result: result.loss.fill_(math.inf))
    flags = run_flags(tmp_path, "--train.eval_steps", "0", "--train.save_steps", "2", "--checkpoint.keep_last", "0",
                      "--train.max_nonfinite_steps", "3")
    with pytest.raises(SystemExit) as stopped:
        main(["train", *flags])
    assert stopped.value.code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "not finite for 3 steps in a row (steps 3 to 5" in err
    # Skipped steps leave the weights as they were, so the save at step 4 holds step 2's weights.
    assert f"last checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step_00000004'}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_non_finite_weights_are_neither_checkpointed_nor_exported(tmp_path, monkeypatch):
    def poison_weights(model, result):
        next(model.parameters()).data.fill_(math.nan)  # gradients stay finite: the step is taken

    on_step(monkeypatch, {12}, poison_weights)
    with pytest.raises(TrainingDiverged, match="weights at step 12 are not finite, so they are not saved"):
        train(run_config(tmp_path, "--train.eval_steps", "0"))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()
    model = torch.nn.Linear(2, 2)
    assert weights_are_finite(model, torch.device("cpu"))
    model.bias.data[0] = math.inf
    assert not weights_are_finite(model, torch.device("cpu"))


def test_a_damaged_latest_checkpoint_is_named_and_resume_falls_back_to_the_one_before(tmp_path, capsys):
    flags = [*FAST, "--train.save_steps", "4", "--checkpoint.keep_last", "0"]
    first = train(run_config(tmp_path, *flags, "--train.max_steps", "8"))
    before = losses(first.output_dir)
    damaged = first.output_dir / "checkpoints" / "step_00000008"
    shard = next(damaged.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated write
    with pytest.raises(UserError, match=f"cannot resume: checkpoint {damaged} is unreadable"):
        train(run_config(tmp_path, *flags, "--train.resume", str(damaged)))  # named explicitly: no fallback
    again = train(run_config(tmp_path, *flags, "--train.max_steps", "8", "--train.resume", "true"))
    out = capsys.readouterr().out
    assert f"checkpoint {damaged} is unreadable" in out
    assert f"resumed from {first.output_dir / 'checkpoints' / 'step_00000004'} at step 4" in out
    assert again.steps == 8 and losses(again.output_dir)[8] == before[8]  # the steps 5-8 again, bitwise


def test_a_user_error_prints_one_line_and_exits_2_and_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = [sys.executable, "-m", "qwen35", "train", "--train.max_step", "3"]
    proc = subprocess.run(bad, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: command line: unknown key 'train.max_step'; did you mean train.max_steps?"
    proc = subprocess.run(bad + ["--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "did you mean train.max_steps" in proc.stderr


@pytest.mark.parametrize("steps, nonfinite, saved", [(3, "at the end of the run (steps 2 to 3", 3),
                                                     (6, "for 5 steps in a row (steps 2 to 6", 5)])
def test_a_learning_rate_that_blows_up_exits_3_naming_the_steps_and_the_last_checkpoint_and_exports_nothing(
        tmp_path, steps, nonfinite, saved):
    """The real command, no injected NaN: step 1 at lr 2.5e4 (warmup) leaves weights whose loss is NaN."""
    flags = run_flags(tmp_path, *FAST[:2], "--optim.lr", "5e4", "--train.max_steps", str(steps),
                      "--train.save_steps", "1", "--checkpoint.keep_last", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "qwen35", "train", *flags], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    # Skipped steps change no weight, so the checkpoints during them hold step 1's weights; none is "final".
    last = tmp_path / "run" / "checkpoints" / f"step_{saved:08d}"
    assert err.startswith("error: training diverged") and nonfinite in err and f"last checkpoint is {last}" in err
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "final.partial").exists()


def test_an_export_cut_short_leaves_no_final_directory(tmp_path, monkeypatch):
    """What a kill during the final export leaves: the weights written, the tokenizer not yet."""
    real = trainer.export_model

    def weights_then_die(model, tokenizer, directory, rt, *media):
        real(model, tokenizer, directory, rt, *media)
        (directory / "tokenizer.json").unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(trainer, "export_model", weights_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(tmp_path, "--train.eval_steps", "0", "--train.max_steps", "2"))
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert (run / "final.partial" / "model.safetensors").is_file()  # the cut-short export, under a name that says so


def test_a_missing_data_file_is_reported_before_the_model_is_loaded(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(trainer, "build_model", no_model)
    with pytest.raises(UserError, match="typo.jsonl"):
        train(run_config(tmp_path, "--data.train_path", str(tmp_path / "typo.jsonl")))
