"""Progress output: a plain line every few seconds where stderr is not a terminal."""

import io
import subprocess
import sys

from qwen35.progress import ProgressLines, progress


def test_lines_are_printed_at_most_once_per_interval_and_once_at_the_end(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("qwen35.progress.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = ProgressLines(total=10, desc="train", interval=30.0, stream=out)
    for _ in range(4):  # 4 steps within 12 s: nothing yet
        clock[0] += 3.0
        bar.update()
    assert out.getvalue() == ""
    clock[0] += 20.0
    bar.set_postfix({"loss": "2.5"})
    bar.update()  # 32 s after the start
    clock[0] += 1.0
    bar.update()  # 1 s after the last line: quiet
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["train: 5/10 (50%) 32s loss=2.5", "train: 6/10 (60%) 33s loss=2.5"]


def test_off_a_terminal_the_factory_gives_plain_lines_and_nothing_when_disabled(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress(5, "eval"), ProgressLines)
    assert not isinstance(progress(5, "eval", enabled=False), ProgressLines)


def test_a_training_run_into_a_pipe_writes_no_carriage_returns(tmp_path):
    from reference import tiny_model_dir
    from qwen35.data.task import build_task

    tiny_model_dir(tmp_path / "model")
    build_task(tmp_path / "task", n_train=64, n_val=8)
    run = subprocess.run(
        [sys.executable, "-m", "qwen35", "train", "--model.path", str(tmp_path / "model"),
         "--data.train_path", str(tmp_path / "task" / "train.jsonl"), "--data.seq_len", "128",
         "--train.global_batch_size", "2", "--train.micro_batch_size", "2", "--train.max_steps", "3",
         "--train.output_dir", str(tmp_path / "run"), "--log.tensorboard", "false",
         "--checkpoint.export_final", "false"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "\r" not in run.stderr
    assert "train: 3/3 (100%)" in run.stderr
