"""`qwen35 rl CONFIG --section.key value`: the config, the prompt data, a whole run on a tiny
model in this process, its checkpoints, exact resume, evaluation and export."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reference import tiny_model_dir
from qwen35.cli import main
from qwen35.data.task import generate_problems
from qwen35.rl.config import RLRunConfig
from qwen35.train.config_parser import load_run_config


def prompt_file(path: Path, n: int) -> Path:
    """dapo-math-17k's layout: a message-list prompt and a string label."""
    rows = [{"prompt": [{"role": "user", "content": p.question}], "label": p.answer} for p in generate_problems(n, seed=3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rl_keys_go_through_the_train_parser():
    cfg = load_run_config(None, ["--rollout.temperature", "0.7", "--grpo.eps_clip_high=0.3", "--grpo.dynamic_sampling",
                                 "--data.template_kwargs", "{enable_thinking: false}"], RLRunConfig)
    assert cfg.rollout.temperature == 0.7 and cfg.grpo.eps_clip_high == 0.3 and cfg.grpo.dynamic_sampling
    assert cfg.data.template_kwargs == {"enable_thinking": False}
    step = cfg.grpo.grpo(cfg.rollout)
    assert step.sampling.temperature == 0.7 and step.loss.eps_clip_high == 0.3 and step.dynamic_sampling
    with pytest.raises(ValueError, match="did you mean rollout.temperature"):
        load_run_config(None, ["--rollout.temprature", "0.7"], RLRunConfig)
    with pytest.raises(ValueError, match="did you mean rollout.n_samples_per_prompt"):
        load_run_config(None, ["--train.n_samples_per_prompt", "4"], RLRunConfig)
    with pytest.raises(ValueError, match="rollout.n_samples_per_prompt >= 2"):
        load_run_config(None, ["--rollout.n_samples_per_prompt", "1"], RLRunConfig)
    with pytest.raises(ValueError, match="grpo.overlong penalty"):
        load_run_config(None, ["--grpo.overlong", "penalty"], RLRunConfig)
    for flags in (["--optim.name", "adamw8bit"], ["--optim.weights", "bf16"], ["--optim.in_backward", "true"]):
        with pytest.raises(ValueError, match="are for train; a GRPO run trains with AdamW on float32 weights"):
            load_run_config(None, flags, RLRunConfig)


def test_the_miles_recipe_keeps_its_numbers():
    cfg = load_run_config(Path(__file__).parents[2] / "configs" / "rl" / "dapo_math_4b.yaml", [], RLRunConfig)
    assert (cfg.train.prompts_per_step, cfg.rollout.n_samples_per_prompt) == (32, 8)
    assert (cfg.grpo.eps_clip, cfg.grpo.eps_clip_high, cfg.grpo.kl_coef) == (0.2, 0.28, 0.0)
    assert (cfg.rollout.max_response_length, cfg.eval.n_samples_per_eval_prompt) == (8192, 16)
    assert cfg.optim.lr == 1e-6 and cfg.model.path.endswith("Qwen3.5-4B")


def test_rl_help_lists_every_section_and_a_user_error_is_one_line(capsys, tmp_path):
    main(["rl", "--help"])  # returns: exit code 0
    text = capsys.readouterr().out
    for key in ("--rollout.n_samples_per_prompt", "--grpo.eps_clip_high", "--eval.n_samples_per_eval_prompt",
                "--data.input_key", "--lora.rank", "--train.prompts_per_step"):
        assert key in text
    with pytest.raises(SystemExit) as stopped:
        main(["rl", "--grpo.kl_typ", "k3"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "did you mean grpo.kl_type" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as stopped:
        main(["rl", "--rollout.temperature", "0.5"])
    assert stopped.value.code == 2 and "data.train_path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["rl", "--model.path", str(tmp_path), "--data.train_path", str(tmp_path / "p.jsonl"),
              "--grpo.reward", "no_such_reward"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("error: grpo.reward: reward 'no_such_reward'")


def _flags(tmp_path, out, *extra):
    if not (tmp_path / "model").exists():
        tiny_model_dir(tmp_path / "model")
        prompt_file(tmp_path / "train.jsonl", 24)
        prompt_file(tmp_path / "heldout.jsonl", 3)
    return ["--model.path", str(tmp_path / "model"), "--data.train_path", str(tmp_path / "train.jsonl"),
            "--eval.path", str(tmp_path / "heldout.jsonl"), "--eval.steps", "2", "--eval.n_samples_per_eval_prompt",
            "2", "--eval.temperature", "1.0", "--eval.max_response_length", "4",
            "--grpo.reward", "toy_rewards:short", "--rollout.n_samples_per_prompt", "4",
            "--rollout.max_response_length", "6", "--train.prompts_per_step", "3", "--grpo.mini_batches", "2",
            "--grpo.micro_batch_size", "4", "--optim.lr", "3e-3", "--optim.scheduler", "cosine",
            "--train.max_steps", "4", "--train.save_steps", "2", "--checkpoint.keep_last", "0",
            "--train.output_dir", str(tmp_path / out), "--log.tensorboard", "false", *extra]


def _rows(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    main(["rl", *_flags(tmp_path, "run")])
    run = tmp_path / "run"
    rows = _rows(run)
    steps = {r["step"]: r for r in rows if "reward_mean" in r}
    assert sorted(steps) == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_pass@1" in r] == [0, 2, 4]
    assert all(r["updates"] == 2 for r in steps.values())
    assert max(r["logprob_mismatch_max"] for r in steps.values()) <= 1e-5  # engine == training forward
    assert (run / "final" / "tokenizer.json").is_file()
    weights = load_file(run / "final" / "model.safetensors")
    start = load_file(tmp_path / "model" / "model.safetensors")
    assert any(not torch.equal(weights[k], start[k]) for k in start)

    # cut the run short after its step-2 checkpoint, then continue it
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.rmtree(run / "final")
    main(["rl", *_flags(tmp_path, "run", "--train.resume", "true")])
    again = [r for r in _rows(run)[len(rows):] if "reward_mean" in r]
    assert [r["step"] for r in again] == [3, 4]
    for r in again:
        for key in ("reward_mean", "policy_loss", "grad_norm", "response_length_mean", "lr", "clip_fraction"):
            assert r[key] == steps[r["step"]][key], (r["step"], key)
    resumed = load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)

    with pytest.raises(SystemExit) as refused:  # a fresh run into a used output directory
        main(["rl", *_flags(tmp_path, "run")])
    assert refused.value.code == 2


def test_lora_run_exports_an_adapter_and_keeps_the_base(tmp_path):
    flags = _flags(tmp_path, "lora", "--lora.rank", "4", "--grpo.kl_coef", "0.1", "--train.max_steps", "2",
                   "--optim.lr", "1e-2", "--grpo.mini_batches", "1")
    main(["rl", *flags])
    rows = [r for r in _rows(tmp_path / "lora") if "reward_mean" in r]
    assert rows[0]["kl"] < 1e-6 < rows[1]["kl"]  # the reference is the base: equal to the policy at first
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "lora" / "final" / "model.safetensors").exists()


def test_a_cpu_offloaded_optimizer_trains_like_the_plain_one(tmp_path):
    """`optim.cpu_offload` (float32 masters and moments in CPU memory) through the GRPO loop: on a
    float32 CPU model its steps are AdamW's, so the run's losses and final weights are the plain run's."""
    for out, extra in (("plain", ()), ("offload", ("--optim.cpu_offload", "true"))):
        main(["rl", *_flags(tmp_path, out, "--train.max_steps", "2", "--train.save_steps", "0", *extra)])
    plain, offload = ([r for r in _rows(tmp_path / d) if "reward_mean" in r] for d in ("plain", "offload"))
    assert [r["step"] for r in offload] == [1, 2]
    for a, b in zip(plain, offload):
        assert a["reward_mean"] == b["reward_mean"]
        assert abs(a["policy_loss"] - b["policy_loss"]) <= 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5
    start = load_file(tmp_path / "model" / "model.safetensors")
    ours, theirs = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("plain", "offload"))
    assert any(not torch.equal(ours[k], start[k]) for k in start)
    assert all(torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-6) for k in ours)
