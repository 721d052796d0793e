"""The built-in GRPO run: `qwen35 rl` with no arguments, on a CPU, in minutes.

It starts from the built-in SFT run's export (`outputs/default/final`, trained first by the
built-in `qwen35 train` when missing), runs GRPO on the same generated arithmetic task with the
task's own exact-match check as the verifiable reward, and reports held-out exact match (greedy,
the same 500 problems as the SFT run's report) before and after, also written to
`<output_dir>/eval.json` as `{"before": x, "after": y}`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen35.data.task import load_eval_examples
from qwen35.rl.collect import evaluate
from qwen35.rl.data import PromptExample
from qwen35.rl.loss import LossConfig
from qwen35.rl.rewards import resolve_reward
from qwen35.rl.rollout import SamplingConfig
from qwen35.rl.trainer import GRPOConfig, grpo_step

TASK_REWARD = "qwen35.data.task:exact_match"  # (completion, answer) scorer of the SFT report


@dataclass(frozen=True)
class BuiltinRL:
    sft_dir: str = "outputs/default"
    output_dir: str = "outputs/default-rl"
    # 64 prompts and one AdamW step per rollout at 3e-5: 16 prompts, two steps at 5e-5 (the first
    # setting) lost 4 points; smaller batches and larger rates cost accuracy (docs/rl.md)
    steps: int = 40
    prompts_per_step: int = 64
    lr: float = 3e-5
    seed: int = 0
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(
        sampling=SamplingConfig(n_samples_per_prompt=8, temperature=1.0, max_response_length=16),
        loss=LossConfig(), mini_batches=1, micro_batch_size=64, dynamic_sampling=True))


def _task_reward(prompt: str, completion: str, label: str) -> float:
    return float(resolve_reward(TASK_REWARD)(completion, label))


def _examples(path: Path, tok) -> list[PromptExample]:
    out = []
    for messages, answer in load_eval_examples(path):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(PromptExample(tok(text, add_special_tokens=False)["input_ids"], text, answer))
    return out


def _ensure_sft_export(sft_dir: Path) -> Path:
    final = sft_dir / "final"
    if not (final / "config.json").is_file():
        from qwen35.train.builtin import DEFAULT_RUN_CONFIG, run_default_or_train
        from qwen35.train.config_parser import load_run_config

        print(f"no SFT export at {final}: running the built-in `qwen35 train` first")
        run_default_or_train(load_run_config(DEFAULT_RUN_CONFIG, [f"--train.output_dir={sft_dir}"]))
    return final


def run_builtin(run: BuiltinRL = BuiltinRL()) -> dict:
    from transformers import AutoTokenizer

    from qwen35.model import Qwen35ForCausalLM

    torch.manual_seed(run.seed)
    sft_dir, out_dir = Path(run.sft_dir), Path(run.output_dir)
    final = _ensure_sft_export(sft_dir)
    policy = Qwen35ForCausalLM.from_pretrained(final, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(final)
    train = _examples(sft_dir / "builtin" / "task" / "train.jsonl", tok)
    val = _examples(sft_dir / "builtin" / "task" / "val.jsonl", tok)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    greedy = SamplingConfig(n_samples_per_prompt=1, temperature=0.0, max_response_length=16)

    before = evaluate(policy, val, _task_reward, decode, greedy)
    print(f"held-out exact match before GRPO: {before:.1%} ({len(val)} problems)")
    rng = random.Random(run.seed)
    order = iter(rng.sample(train, len(train)))
    draw = lambda k: [next(order) for _ in range(k)]  # noqa: E731
    optimizer = torch.optim.AdamW(policy.parameters(), lr=run.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(run.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out_dir / "metrics.jsonl", "w") as log:
        for step in range(1, run.steps + 1):
            metrics = grpo_step(policy, optimizer, draw(run.prompts_per_step), _task_reward, decode, run.grpo,
                                generator, more_prompts=draw)
            log.write(json.dumps({"step": step, **metrics}) + "\n")
            log.flush()
            if step % 10 == 0 or step == 1:
                print(f"step {step}: reward {metrics['reward_mean']:.3f}, groups kept {metrics['groups_kept']}, "
                      f"dropped {metrics['groups_dropped']}, clip {metrics['clip_fraction']:.3f}, "
                      f"{time.perf_counter() - start:.0f} s")
    after = evaluate(policy, val, _task_reward, decode, greedy)
    policy.save_pretrained(out_dir / "final")
    tok.save_pretrained(out_dir / "final")
    result = {"before": before, "after": after}
    (out_dir / "eval.json").write_text(json.dumps(result) + "\n")
    print(f"held-out exact match: SFT {before:.1%} -> GRPO {after:.1%} ({len(val)} problems; "
          f"model in {out_dir / 'final'})")
    return result
