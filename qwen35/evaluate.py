"""`qwen35 eval`: a trained model (a full export or a LoRA adapter) on a data file.

Any data file the trainer reads gets the training loss over its assistant tokens (the tokens a
run learns from, rendered and packed exactly as in training) and its perplexity. The built-in
task's files (records with an `answer`) also get exact match of the greedy answers.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen35.data.dataset import build_datasets
from qwen35.data.loader import PackedLoader
from qwen35.errors import UserError
from qwen35.lora.peft_format import ADAPTER_CONFIG, load_adapter
from qwen35.model import Qwen35ForCausalLM
from qwen35.train.config import DataConfig
from qwen35.train import rundir
from qwen35.train.builtin import task_accuracy
from qwen35.train.config_parser import load_run_config
from qwen35.train.setup import Runtime
from qwen35.train.trainer import loss_totals


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    loss_tokens: int
    exact_match: float | None  # only for the built-in task's files


def load_trained(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Qwen35ForCausalLM:
    """A model directory as training exports it: full weights, or an adapter on its base model
    (the base as `adapter_config.json` records it; a relative path counts from the adapter)."""
    directory = Path(model_dir)
    if not directory.is_dir():
        raise UserError(f"--model {directory}: no such directory")
    adapter_config = directory / ADAPTER_CONFIG
    if not adapter_config.is_file():
        return Qwen35ForCausalLM.from_pretrained(directory, dtype=dtype)
    recorded = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    base = Path(recorded) if recorded else None
    if base is not None and not base.is_absolute() and not (base / "config.json").is_file():
        base = directory / base
    if base is None or not (base / "config.json").is_file():
        raise UserError(f"{adapter_config}: its base model {recorded!r} is not a model directory here")
    return load_adapter(Qwen35ForCausalLM.from_pretrained(base, dtype=dtype), directory)


def is_task_file(path: Path) -> bool:
    """The built-in task's JSONL: chat records with the expected `answer` beside them."""
    if path.suffix != ".jsonl":
        return False
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "answer" in record and "messages" in record


def evaluate(model, tokenizer, data: str | Path, seq_len: int = 2048, limit: int | None = None) -> EvalResult:
    data = Path(data)
    rt = Runtime(torch.device("cpu"), 0, 1, None)
    with tempfile.TemporaryDirectory() as cache:
        settings = DataConfig(train_path=str(data), seq_len=seq_len, val_fraction=0.0, cache_dir=cache)
        rows = build_datasets(settings, tokenizer, progress=False).train
        loader = PackedLoader(rows, 1, shuffle=False)  # one row per batch: a batch never repeats a row
        batches = itertools.islice(loader, loader.batches_per_epoch)
        total, tokens = loss_totals(model, batches, rt)
    if not tokens:
        raise UserError(f"{data}: no assistant tokens to score")
    loss = total / tokens
    exact = task_accuracy(model, tokenizer, data, limit) if is_task_file(data) else None
    return EvalResult(loss, math.exp(min(loss, 700.0)), tokens, exact)


def held_out_file(model_dir: Path) -> Path:
    """Without `--data`: the held-out file of the run that wrote `model_dir` (`OUT/final`), its
    `data.val_path` resolved where that run started (a LoRA run on the built-in task reads the
    SFT run's files); else the built-in task's beside the model."""
    out_dir = model_dir.parent
    if (out_dir / "run_config.yaml").is_file():
        val_path = load_run_config(out_dir / "run_config.yaml", []).data.val_path
        if val_path:
            return rundir.working_dir(out_dir) / val_path
    return out_dir / "builtin" / "task" / "val.jsonl"


def run_eval(model_dir: str, data: str | None, limit: int | None, seq_len: int) -> EvalResult:
    """`qwen35 eval`; without `--data`, the held-out file of the model's run (`held_out_file`)."""
    from transformers import AutoTokenizer

    model = load_trained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = Path(data) if data else held_out_file(Path(model_dir))
    if not path.is_file():
        raise UserError(f"no data file at {path}; pass --data PATH (any file the trainer reads)")
    result = evaluate(model, tokenizer, path, seq_len, limit)
    print(f"{path}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f} "
          f"over {result.loss_tokens} assistant tokens")
    if result.exact_match is not None:
        print(f"exact-match accuracy on {path}: {result.exact_match:.1%}")
    return result
