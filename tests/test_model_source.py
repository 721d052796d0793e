"""What a run checks about its model source before any work, and how the built-in run fits its
micro-batch to the processes of a torchrun job."""

from types import SimpleNamespace

import pytest

from qwen35.build import TOKENIZER_FILES, build_model, load_tokenizer
from qwen35.errors import UserError
from qwen35.train.builtin import DEFAULT_RUN_CONFIG, fit_micro_batch
from qwen35.train.config_parser import load_run_config
from reference import tiny_model_dir

def test_a_model_directory_without_tokenizer_files_is_refused_naming_it(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    cfg = load_run_config(None, ["--model.path", str(model), "--train.output_dir", str(tmp_path / "run")])
    assert len(load_tokenizer(cfg)) > 256  # the directory's own tokenizer
    for name in TOKENIZER_FILES:
        (model / name).unlink(missing_ok=True)
    with pytest.raises(UserError, match=f"no tokenizer in {model}"):
        load_tokenizer(cfg)

@pytest.mark.parametrize("processes, micro", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_the_built_in_run_splits_its_global_batch_over_any_power_of_two_processes(monkeypatch, processes, micro):
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    cfg = fit_micro_batch(load_run_config(DEFAULT_RUN_CONFIG, []))
    assert cfg.train.micro_batch_size == micro
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * processes) == 0

def test_a_global_batch_that_cannot_split_names_the_flag(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="--train.global_batch_size to a multiple of 3"):
        fit_micro_batch(load_run_config(DEFAULT_RUN_CONFIG, []))


def test_the_built_in_run_with_optim_in_backward_under_torchrun_is_refused_as_one_process_only(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = fit_micro_batch(load_run_config(DEFAULT_RUN_CONFIG, ["--optim.in_backward", "true", "--train.grad_clip", "0"]))
    assert cfg.train.micro_batch_size == 8  # not shrunk into a config error about micro-batches
    with pytest.raises(UserError, match="optim.in_backward runs in one process"):
        build_model(cfg, SimpleNamespace(world_size=2), tokenizer=None)
