"""An output directory belongs to one run: what `train.resume` and `train.overwrite_output_dir`
do with it, and every state they refuse (before a model is built)."""

import json

import pytest
import torch

from qwen35.errors import UserError
from qwen35.train import checkpoint as ckpt
from qwen35.train.config import TrainConfig
from qwen35.train.rundir import claim, plan_run, run_owner


def fake_checkpoint(out_dir, step, run_id="earlier-run"):
    path = out_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "checkpoint.json").write_text(json.dumps({"run_id": run_id, "step": step}))
    (path / "trainer_state.pt").write_bytes(b"")
    return path


def plan(out_dir, resume=False, overwrite=False):
    return plan_run(TrainConfig(output_dir=str(out_dir), resume=resume, overwrite_output_dir=overwrite), out_dir)


def test_a_fresh_run_claims_an_empty_directory_with_a_new_id(tmp_path):
    first = plan(tmp_path / "run")
    claim(tmp_path / "run", first)
    assert run_owner(tmp_path / "run") == first.run_id and first.resume_from == ()
    assert plan(tmp_path / "other").run_id != first.run_id


def test_a_fresh_run_into_a_directory_with_checkpoints_is_refused(tmp_path):
    fake_checkpoint(tmp_path, 4)
    with pytest.raises(UserError, match=r"already holds a run .*step_00000004.*--train.resume true.*"
                                        r"--train.overwrite_output_dir true"):
        plan(tmp_path)


def test_a_fresh_run_into_a_directory_with_another_runs_metrics_is_refused(tmp_path):
    claim(tmp_path, plan(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(UserError, match="already holds run .*metrics.jsonl"):
        plan(tmp_path)


def test_overwrite_deletes_the_previous_runs_record_and_keeps_the_rest(tmp_path):
    fake_checkpoint(tmp_path, 4)
    for name in ("final", "export_step_00000002", "builtin"):
        (tmp_path / name).mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    new = plan(tmp_path, overwrite=True)
    claim(tmp_path, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builtin", "run.json"]
    assert run_owner(tmp_path) == new.run_id


def test_resume_true_with_nothing_to_resume_is_refused_and_auto_starts_fresh(tmp_path):
    with pytest.raises(UserError, match="no complete checkpoint to resume; set train.resume auto"):
        plan(tmp_path, resume=True)
    (tmp_path / "checkpoints" / "step_00000008.partial").mkdir(parents=True)  # not resumable
    with pytest.raises(UserError, match="no complete checkpoint"):
        plan(tmp_path, resume=True)
    assert plan(tmp_path / "empty", resume="auto").resume_from == ()


def test_auto_restarts_its_own_run_that_died_before_its_first_checkpoint(tmp_path):
    first = plan(tmp_path)
    claim(tmp_path, first)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    again = plan(tmp_path, resume="auto")
    assert again.run_id == first.run_id and again.resume_from == ()
    with pytest.raises(UserError, match="already holds run"):
        plan(tmp_path)  # a fresh run is still refused


def test_resume_true_and_auto_continue_the_owner_newest_checkpoint_first(tmp_path):
    first = plan(tmp_path)
    claim(tmp_path, first)
    old, new = fake_checkpoint(tmp_path, 4, first.run_id), fake_checkpoint(tmp_path, 8, first.run_id)
    for resume in (True, "auto", str(tmp_path), str(tmp_path / "checkpoints")):
        again = plan(tmp_path, resume=resume)
        assert again.run_id == first.run_id and again.resume_from == (new, old) and not again.clear


def test_resume_from_one_checkpoint_takes_only_that_one(tmp_path):
    old = fake_checkpoint(tmp_path / "a", 4)
    fake_checkpoint(tmp_path / "a", 8)
    assert plan(tmp_path / "a", resume=str(old)).resume_from == (old,)


def test_resume_from_another_directory_starts_a_new_run_there(tmp_path):
    source = fake_checkpoint(tmp_path / "a", 4)
    forked = plan(tmp_path / "b", resume=str(tmp_path / "a"))
    assert forked.resume_from == (source,) and forked.run_id != "earlier-run"
    claim(tmp_path / "b", forked)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["started_from"] == str(source.resolve())
    fake_checkpoint(tmp_path / "c", 2)
    with pytest.raises(UserError, match="already holds"):  # the target must be free as for a fresh run
        plan(tmp_path / "c", resume=str(source))


def test_resume_paths_that_are_not_checkpoints_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        plan(tmp_path, resume=str(tmp_path / "missing"))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(UserError, match="neither a checkpoint .* nor an output directory"):
        plan(tmp_path, resume=str(tmp_path / "elsewhere"))
    partial = tmp_path / "x" / "checkpoints" / "step_00000004.partial"
    partial.mkdir(parents=True)
    with pytest.raises(UserError, match="incomplete checkpoint"):
        plan(tmp_path, resume=str(partial))


def test_overwrite_and_resume_of_the_same_directory_are_refused_together(tmp_path):
    fake_checkpoint(tmp_path, 4)
    for resume in (True, "auto", str(tmp_path)):
        with pytest.raises(UserError, match="overwrite_output_dir would delete the checkpoints"):
            plan(tmp_path, resume=resume, overwrite=True)


def test_a_damaged_run_record_is_refused(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(UserError, match="run.json is not a run record"):
        plan(tmp_path)


def test_pruning_deletes_only_this_runs_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    other = fake_checkpoint(tmp_path, 1, "other-run")
    root = tmp_path / "checkpoints"
    for step in (2, 3, 4):
        ckpt.save_checkpoint(root, step, model, optimizer, {}, keep_last=1, run_id="this-run")
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == [other.name, "step_00000004"]
    assert ckpt.checkpoint_run_id(root / "step_00000004") == "this-run"
