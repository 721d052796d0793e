"""The built-in default run and the task evaluation, a layer above the trainer that it calls.

`qwen35 train` with no arguments, on a fresh machine, on a CPU, runs `default.yaml`: the `tiny`
preset (the Qwen3.5 architecture at ~1M parameters, with the project's own small tokenizer)
trained from scratch on a generated arithmetic task with checkable answers, through the same
trainer as any other run. It exports a Hugging Face checkpoint and prints the held-out
exact-match accuracy next to the untrained model's. Any run without `data.train_path` trains on
that task.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from qwen35.build import build_model_and_tokenizer, check_model_source
from qwen35.data.task import build_task, load_eval_examples, score
from qwen35.lora import load_adapter
from qwen35.model import Qwen35ForCausalLM
from qwen35.progress import progress
from qwen35.train.config import RunConfig
from qwen35.train.setup import Runtime
from qwen35.train.trainer import train

DEFAULT_RUN_CONFIG = Path(__file__).parent / "default.yaml"


def _builtin_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / "builtin"


@torch.no_grad()
def task_accuracy(model, tok, val_path: Path, limit: int | None = None, batch_size: int = 64) -> float:
    """Greedy answers to the held-out problems, scored by exact match of the number."""
    examples = load_eval_examples(val_path)[:limit]
    model.eval()
    predictions = []
    bar = progress(len(examples), "eval", unit="problem", leave=False)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
                   for m, _ in chunk]
        outputs = model.generate(prompts, max_new_tokens=16, eos_token_id=tok.eos_token_id)
        predictions += [tok.decode(o, skip_special_tokens=True) for o in outputs]
        bar.update(len(chunk))
    bar.close()
    return score(predictions, [a for _, a in examples])


def run_default_or_train(cfg: RunConfig):
    """Trains `cfg`; without `data.train_path`, first generates the built-in task and then
    reports its held-out accuracy before and after training (not for a random preset larger
    than `tiny`, whose size makes the untrained evaluation slow and its result meaningless)."""
    check_model_source(cfg)
    if cfg.data.train_path is not None:
        return train(cfg)
    files = build_task(_builtin_dir(cfg) / "task")
    cfg = replace(cfg, data=replace(cfg.data, train_path=str(files.train), val_path=str(files.val), val_fraction=0.0))
    if cfg.model.preset not in (None, "tiny"):  # random weights at a real size: the task is only data
        return train(cfg)
    torch.manual_seed(cfg.train.seed)  # the trainer draws the same initial weights from this seed
    untrained, tok = build_model_and_tokenizer(cfg, Runtime(torch.device("cpu"), 0, 1, None))
    before = task_accuracy(untrained, tok, files.val)
    del untrained
    result = train(cfg)
    if result.export_dir is None or (dist.is_initialized() and dist.get_rank() != 0):
        return result  # under torchrun rank 0 scores the export, which it alone writes
    if cfg.lora.rank:  # the export is an adapter for the checkpoint at model.path
        trained = load_adapter(Qwen35ForCausalLM.from_pretrained(cfg.model.path), result.export_dir)
    else:
        trained = Qwen35ForCausalLM.from_pretrained(result.export_dir)
    after = task_accuracy(trained, tok, files.val)
    print(f"held-out exact match: untrained {before:.1%} -> trained {after:.1%} "
          f"({len(load_eval_examples(files.val))} problems; model in {result.export_dir})")
    return result
