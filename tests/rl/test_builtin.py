import json

from reference import tiny_model_dir
from qwen35.data.task import build_task
from qwen35.rl.builtin import BuiltinRL, run_builtin
from qwen35.rl.rollout import SamplingConfig
from qwen35.rl.trainer import GRPOConfig


def test_builtin_run_goes_from_an_sft_export_to_eval_json(tmp_path):
    """The whole built-in run on a tiny stand-in for the SFT export: evaluation, steps, export."""
    sft = tmp_path / "sft"
    tiny_model_dir(sft / "final")
    build_task(sft / "builtin" / "task", n_train=40, n_val=6)
    run = BuiltinRL(sft_dir=str(sft), output_dir=str(tmp_path / "rl"), steps=2, prompts_per_step=2,
                    grpo=GRPOConfig(sampling=SamplingConfig(n_samples_per_prompt=2, max_response_length=4),
                                    dynamic_sampling=True, max_sampling_rounds=2))
    result = run_builtin(run)
    assert json.loads((tmp_path / "rl" / "eval.json").read_text()) == result
    assert set(result) == {"before", "after"} and all(0.0 <= v <= 1.0 for v in result.values())
    lines = (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert (tmp_path / "rl" / "final" / "config.json").is_file()
    assert (tmp_path / "rl" / "final" / "tokenizer.json").is_file()


def test_rl_command_describes_the_builtin_run_and_refuses_a_stray_argument(capsys):
    import pytest

    from qwen35.cli import main

    main(["rl", "--help"])
    assert "built-in GRPO run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main(["rl", "--train.max_steps", "3", "extra"])
    assert stopped.value.code == 2  # a user error: one message, no traceback
    assert "unexpected argument 'extra'" in capsys.readouterr().err
