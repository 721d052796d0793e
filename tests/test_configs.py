"""Every config file shipped under configs/ parses into its run config (typos, types, rules)."""

from pathlib import Path

import pytest

from qwen35.rl.config import RLRunConfig
from qwen35.train.config import RunConfig
from qwen35.train.config_parser import load_run_config

CONFIGS = Path(__file__).parent.parent / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def test_configs_are_found():
    assert {p.parent.name for p in SHIPPED} >= {"text", "rl"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_parses(path):
    config_cls = RLRunConfig if path.parent.name == "rl" else RunConfig
    cfg = load_run_config(path, [], config_cls)
    assert isinstance(cfg, config_cls)
    assert cfg.model.path or cfg.model.preset  # every shipped config names its model (placeholder or not)


def test_the_miles_recipe_keeps_its_numbers():
    cfg = load_run_config(CONFIGS / "rl" / "dapo_math_4b.yaml", [], RLRunConfig)
    assert (cfg.train.prompts_per_step, cfg.rollout.n_samples_per_prompt) == (32, 8)
    assert (cfg.grpo.eps_clip, cfg.grpo.eps_clip_high, cfg.grpo.kl_coef) == (0.2, 0.28, 0.0)
    assert (cfg.rollout.max_response_length, cfg.eval.n_samples_per_eval_prompt) == (8192, 16)
    assert cfg.optim.lr == 1e-6 and cfg.model.path.endswith("Qwen3.5-4B")
