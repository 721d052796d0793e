import dataclasses
from pathlib import Path

import pytest

from qwen35.train.config import SECTIONS, RunConfig
from qwen35.train.config_parser import format_help, load_run_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_values_override_defaults_and_flags_override_yaml(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 100\n  seed: 7\noptim:\n  lr: 3.0e-4\n")
    cfg = load_run_config(path, ["--train.max_steps", "20", "--optim.lr=1e-3"])
    assert cfg.train.max_steps == 20  # flag beats YAML
    assert cfg.optim.lr == 1e-3
    assert cfg.train.seed == 7  # YAML beats default
    assert cfg.train.micro_batch_size == RunConfig().train.micro_batch_size  # default kept


def test_the_last_of_repeated_flags_wins():
    cfg = load_run_config(None, ["--train.max_steps", "5", "--train.max_steps=9"])
    assert cfg.train.max_steps == 9


@pytest.mark.parametrize(
    "flag, value, attr, expected",
    [
        ("train.max_steps", "20", "train.max_steps", 20),
        ("train.max_steps", "null", "train.max_steps", None),
        ("optim.lr", "1e-5", "optim.lr", 1e-5),
        ("optim.min_lr_ratio", "0", "optim.min_lr_ratio", 0.0),
        ("train.compile", "yes", "train.compile", True),
        ("train.activation_checkpointing", "offload", "train.activation_checkpointing", "offload"),
        ("parallel.cpu_offload", "1", "parallel.cpu_offload", True),
        ("log.tensorboard", "False", "log.tensorboard", False),
        ("model.dtype", "bfloat16", "model.dtype", "bfloat16"),
        ("model.preset", "0.8B", "model.preset", "0.8B"),
        ("optim.betas", "[0.9,0.99]", "optim.betas", (0.9, 0.99)),
        ("train.resume", "true", "train.resume", True),
        ("train.resume", "ckpt/step_100", "train.resume", "ckpt/step_100"),
    ],
)
def test_flag_strings_are_parsed_to_the_field_type(flag, value, attr, expected):
    cfg = load_run_config(None, [f"--{flag}", value])
    section, name = attr.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == expected and type(got) is type(expected)


def test_a_bare_bool_flag_means_true():
    cfg = load_run_config(None, ["--train.compile", "--train.max_steps", "3"])
    assert cfg.train.compile is True
    assert cfg.train.max_steps == 3


def test_yaml_reads_1e_minus_5_as_a_float_not_a_string(tmp_path):
    # YAML 1.1 parses `1e-5` (no dot) as a string; a user means the number.
    cfg = load_run_config(write(tmp_path, "optim:\n  lr: 1e-5\n"), [])
    assert cfg.optim.lr == 1e-5


def test_home_is_expanded_in_paths_given_after_an_equals_sign():
    cfg = load_run_config(None, ["--model.path=~/Qwen3.5-9B"])
    assert cfg.model.path == str(Path.home() / "Qwen3.5-9B")


def test_unknown_key_in_yaml_names_the_file_and_the_closest_key(tmp_path):
    path = write(tmp_path, "train:\n  max_step: 20\n")
    with pytest.raises(ValueError, match="did you mean train.max_steps") as e:
        load_run_config(path, [])
    assert str(path) in str(e.value)


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    with pytest.raises(ValueError, match="did you mean optim.lr"):
        load_run_config(write(tmp_path, "train:\n  lr: 1.0e-4\n"), [])


def test_unknown_section_in_yaml_names_the_file_and_the_closest_section(tmp_path):
    path = write(tmp_path, "trian:\n  max_steps: 20\n")
    with pytest.raises(ValueError, match="unknown section 'trian'; did you mean train") as e:
        load_run_config(path, [])
    assert str(path) in str(e.value)


def test_unknown_flag_names_the_closest_key():
    with pytest.raises(ValueError, match="command line: unknown key 'data.trainpath'; "
                                         "did you mean data.train_path"):
        load_run_config(None, ["--data.trainpath", "x.jsonl"])


def test_bad_value_names_the_source_the_key_and_the_expected_type(tmp_path):
    with pytest.raises(ValueError, match=r"command line: train.max_steps = 'ten': expected int"):
        load_run_config(None, ["--train.max_steps", "ten"])
    with pytest.raises(ValueError, match=r"model.dtype = 'fp16': expected auto\|float32\|bfloat16"):
        load_run_config(None, ["--model.dtype", "fp16"])
    with pytest.raises(ValueError, match=r"optim.betas = \[0.9\]: expected tuple\[float, float\]"):
        load_run_config(write(tmp_path, "optim:\n  betas: [0.9]\n"), [])
    with pytest.raises(ValueError, match="train.compile = 'maybe': expected bool"):
        load_run_config(None, ["--train.compile", "maybe"])
    with pytest.raises(ValueError, match=r"train.activation_checkpointing = True: expected none\|selective\|full\|offload"):
        load_run_config(write(tmp_path, "train:\n  activation_checkpointing: true\n"), [])
    with pytest.raises(ValueError, match="train.offload_activations is gone: set train.activation_checkpointing: offload"):
        load_run_config(None, ["--train.offload_activations", "true"])


def test_yaml_bool_is_not_accepted_as_an_int(tmp_path):
    with pytest.raises(ValueError, match="train.max_steps = True"):
        load_run_config(write(tmp_path, "train:\n  max_steps: true\n"), [])


def test_flag_without_a_value_is_an_error_unless_boolean():
    with pytest.raises(ValueError, match="--train.max_steps needs a value"):
        load_run_config(None, ["--train.max_steps"])


def test_positional_argument_among_overrides_is_an_error():
    with pytest.raises(ValueError, match="unexpected argument 'extra'"):
        load_run_config(None, ["extra"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train.max_steps", "null", "--train.num_epochs", "null"],
         "set train.max_steps or train.num_epochs"),
        (["--train.global_batch_size", "6", "--train.micro_batch_size", "4"],
         "must be a positive multiple of train.micro_batch_size"),
        (["--model.path", "m", "--model.preset", "9B"], "exclusive"),
        (["--data.val_path", "v.jsonl", "--data.val_fraction", "0.1"], "exclusive"),
        (["--train.micro_batch_size", "0"], "train.micro_batch_size must be > 0"),
        (["--optim.in_backward", "true", "--train.global_batch_size", "1", "--train.micro_batch_size", "1"],
         "cannot clip: set train.grad_clip 0"),
        (["--optim.in_backward", "true", "--train.grad_clip", "0", "--train.global_batch_size", "8",
          "--train.micro_batch_size", "4"], "a step is one micro-batch"),
        (["--optim.in_backward", "true", "--optim.name", "adamw8bit"], "optim.in_backward is float32 AdamW"),
    ],
)
def test_inconsistent_settings_are_rejected(flags, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, flags)


def test_max_steps_alone_is_enough_to_end_the_run():
    cfg = load_run_config(None, ["--train.num_epochs", "null", "--train.max_steps", "10"])
    assert cfg.train.max_steps == 10


def test_help_lists_every_key_with_its_type_and_default():
    text = format_help()
    defaults = RunConfig()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            line = next(line for line in text.splitlines() if f"--{section}.{f.name} " in line)
            assert "default:" in line
            assert f.metadata["help"] in text
    assert "--train.max_steps  (int | None, default: null)" in text
    assert f"--optim.lr  (float, default: {defaults.optim.lr})" in text
    assert "--optim.betas  (tuple[float, float], default: [0.9, 0.95])" in text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    """Every file under configs/: configs/rl/ holds `qwen35 rl` configs, the rest `qwen35 train`'s."""
    from qwen35.rl.config import RLRunConfig

    config_cls = RLRunConfig if path.parent.name == "rl" else RunConfig
    cfg = load_run_config(path, [], config_cls)
    assert isinstance(cfg, config_cls)
    if cfg.model.preset is not None:  # a built-in run (configs/vl/default.yaml): a preset on generated data
        assert cfg.model.path is None and cfg.data.train_path is None
    else:
        assert cfg.model.path is not None and cfg.data.train_path is not None


def test_the_shipped_configs_are_found():
    names = {p.name for p in CONFIGS}
    assert {"sft.yaml", "sft_0.8b.yaml", "sft_2b.yaml", "sft_9b.yaml", "dapo_math_4b.yaml"} <= names


def test_dumped_config_loads_back_equal(tmp_path):
    sft = next(p for p in CONFIGS if p.name == "sft.yaml")
    cfg = load_run_config(sft, ["--train.resume", "true", "--optim.betas", "[0.8,0.9]"])
    cfg.save_yaml(tmp_path / "resolved.yaml")
    assert load_run_config(tmp_path / "resolved.yaml", []) == cfg
    assert cfg.to_dict()["optim"]["betas"] == [0.8, 0.9]


def test_missing_yaml_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml does not exist"):
        load_run_config(tmp_path / "nope.yaml", [])
