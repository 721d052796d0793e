"""The built-in default run and the task evaluation, a layer above the trainer that it calls.

`qwen35 train` with no arguments, on a fresh machine, on a CPU, runs `default.yaml`: the `tiny`
preset (the Qwen3.5 architecture at ~1M parameters, with the project's own small tokenizer)
trained from scratch on a generated arithmetic task with checkable answers, through the same
trainer as any other run. It exports a Hugging Face checkpoint and prints the held-out
exact-match accuracy next to the untrained model's. Any run without `data.train_path` trains on
that task.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from qwen35.build import build_model_and_tokenizer, check_model_source, is_vision_language
from qwen35.data.task import build_task, load_eval_examples, score
from qwen35.errors import UserError
from qwen35.lora import load_adapter
from qwen35.model import Qwen35ForCausalLM
from qwen35.progress import progress
from qwen35.train.config import RunConfig
from qwen35.train import rundir
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


def _is_rank_zero() -> bool:
    """Rank 0 of a torchrun job, also before the trainer has started the process group."""
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    """A stage of the built-in run, said once (by rank 0 under torchrun)."""
    if _is_rank_zero():
        print(f"qwen35: {message}", flush=True)


def fit_micro_batch(cfg: RunConfig) -> RunConfig:
    """The built-in run under torchrun: its micro-batch shrinks so that the global batch still
    splits over the data-parallel ranks (8 rows on 1, 2, 4 or 8 processes)."""
    dp = int(os.environ.get("WORLD_SIZE", "1")) // (cfg.parallel.sp * cfg.parallel.cp)
    train_cfg = cfg.train
    # optim.in_backward keeps its one micro-batch: it runs in one process, which build_model says
    if dp > 1 and not cfg.optim.in_backward and train_cfg.global_batch_size % (train_cfg.micro_batch_size * dp):
        if train_cfg.global_batch_size % dp:
            raise UserError(f"train.global_batch_size ({train_cfg.global_batch_size}) does not split over "
                            f"{dp} data-parallel ranks; set --train.global_batch_size to a multiple of {dp}")
        micro = max(m for m in range(1, train_cfg.micro_batch_size + 1)
                    if train_cfg.global_batch_size % (m * dp) == 0)
        cfg = replace(cfg, train=replace(train_cfg, micro_batch_size=micro))
    return cfg


def run_default_or_train(cfg: RunConfig):
    """Trains `cfg`; without `data.train_path`, first generates the built-in task and then
    reports its held-out accuracy before and after training (not for a random preset larger
    than `tiny`, whose size makes the untrained evaluation slow and its result meaningless)."""
    check_model_source(cfg)
    rundir.plan_run(cfg.train, Path(cfg.train.output_dir))  # a refused output directory: before any work
    if cfg.data.train_path is not None:
        return train(cfg)
    if is_vision_language(cfg):  # the built-in image task instead of the arithmetic one
        from qwen35.train.builtin_vl import run_image_default

        return run_image_default(cfg)
    say(f"the built-in task: {_builtin_dir(cfg) / 'task'}")
    files = build_task(_builtin_dir(cfg) / "task")
    cfg = replace(cfg, data=replace(cfg.data, train_path=str(files.train), val_path=str(files.val), val_fraction=0.0))
    if cfg.model.preset not in (None, "tiny"):  # random weights at a real size: the task is only data
        return train(cfg)
    torch.manual_seed(cfg.train.seed)  # the trainer draws the same initial weights from this seed
    untrained, tok = build_model_and_tokenizer(cfg, Runtime(torch.device("cpu"), 0, 1, None))
    before = None
    if _is_rank_zero():  # under torchrun one rank evaluates; every rank trains
        say("evaluating the untrained model on the held-out problems")
        before = task_accuracy(untrained, tok, files.val)
        say(f"training (untrained held-out exact match {before:.1%})")
    del untrained
    result = train(cfg)
    if result.export_dir is None or not _is_rank_zero():
        return result  # under torchrun rank 0 scores the export, which it alone writes
    if cfg.lora.rank:  # the export is an adapter for the checkpoint at model.path
        trained = load_adapter(Qwen35ForCausalLM.from_pretrained(cfg.model.path), result.export_dir)
    else:
        trained = Qwen35ForCausalLM.from_pretrained(result.export_dir)
    say("evaluating the trained model on the held-out problems")
    after = task_accuracy(trained, tok, files.val)
    print(f"held-out exact match: untrained {before:.1%} -> trained {after:.1%} "
          f"({len(load_eval_examples(files.val))} problems; model in {result.export_dir})")
    return result
