import json
import math

import torch

from qwen35.train.metrics import MetricsLogger, WandbSettings


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_log_call_is_one_json_line_with_step_and_values(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, loss=2.5, lr=1e-5, grad_norm=torch.tensor(0.75))
    logger.log(2, loss=2.25, lr=2e-5, tokens_per_s=1234.5, mfu=0.41, memory_gb=12.0)
    logger.log(2, eval_loss=2.4, eval_accuracy=0.5)
    # Read before close(): every line must already be on disk, as after a crash.
    records = read_lines(tmp_path / "metrics.jsonl")
    logger.close()
    assert records == [
        {"step": 1, "loss": 2.5, "lr": 1e-5, "grad_norm": 0.75},
        {"step": 2, "loss": 2.25, "lr": 2e-5, "tokens_per_s": 1234.5, "mfu": 0.41,
         "memory_gb": 12.0},
        {"step": 2, "eval_loss": 2.4, "eval_accuracy": 0.5},
    ]


def test_a_diverged_loss_is_recorded_not_dropped(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, loss=float("nan"))
    assert math.isnan(read_lines(tmp_path / "metrics.jsonl")[0]["loss"])


def test_a_resumed_run_appends_to_the_same_file(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, loss=3.0)
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, loss=2.0)
    assert [r["step"] for r in read_lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_disabled_logger_on_other_ranks_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path / "out", tensorboard=True, enabled=False) as logger:
        logger.log(1, loss=1.0)
    assert not (tmp_path / "out").exists()


def test_tensorboard_event_file_is_written_when_enabled(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log(1, loss=2.0, lr=1e-4)
        logger.log(2, loss=1.5, lr=1e-4)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.0), (2, 1.5)]
    assert "lr" in acc.Tags()["scalars"]


def test_no_tensorboard_directory_when_disabled(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, loss=1.0)
    assert not (tmp_path / "tensorboard").exists()


def test_wandb_offline_receives_every_logged_scalar(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = WandbSettings(project="qwen35-test", run_name="tiny", config={"optim": {"lr": 0.125}})
    with MetricsLogger(tmp_path, tensorboard=False, wandb=settings) as logger:
        logger.log(1, loss=3.0517578125, lr=0.001953125)
        logger.log(2, eval_loss=2.7182818)
    import wandb

    wandb.teardown()  # waits for wandb's writer process to flush the offline run to disk
    # wandb keeps an offline run as one protobuf record log under output_dir/wandb; the history
    # rows carry each key and its JSON value as plain bytes.
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    record_log = runs[0].read_bytes()
    for piece in (b"qwen35-test", b"tiny", b"loss", b"3.0517578125", b"0.001953125", b"eval_loss", b"2.7182818"):
        assert piece in record_log
    assert read_lines(tmp_path / "metrics.jsonl")[0]["loss"] == 3.0517578125
