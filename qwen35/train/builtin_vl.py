"""The built-in vision-language run: `qwen35 train configs/vl/default.yaml`.

The `tiny-vl` preset (the tiny language model and a 2-block vision tower, from scratch, with the
project's small tokenizer) trained on the generated image task (`qwen35.data.vl_task`) through
the same trainer as any run; it exports a checkpoint with its processor files and prints the
held-out accuracy before and after training next to chance.

Accuracy is read off the model's likelihoods: each held-out question is scored with every
possible answer (four colours, or three counts) and the model's answer is the one whose tokens it
finds most likely. That measures exactly what was learned, with no generation loop, and chance is
exact: the mean over the questions of 1 / (number of answers).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen35.build import build_model_and_tokenizer
from qwen35.data.media import MediaEncoder, collate_media, media_row
from qwen35.data.processor import load_image_processor
from qwen35.data.render import ChatRenderer
from qwen35.data.vl_task import build_image_task, load_scenes, record
from qwen35.model.model import next_token_targets
from qwen35.model.vl import Qwen35ForConditionalGeneration
from qwen35.ops.cross_entropy import IGNORE_INDEX
from qwen35.progress import progress
from qwen35.train.builtin import _builtin_dir, _is_rank_zero, say
from qwen35.train.config import RunConfig
from qwen35.train.setup import Runtime
from qwen35.train.step import model_inputs
from qwen35.train.trainer import train


@torch.no_grad()
def image_task_accuracy(model, tokenizer, image_processor, val_path: Path, limit: int | None = None,
                        scenes_per_row: int = 16) -> dict:
    """Held-out accuracy per question kind and overall, with chance, by likelihood ranking. The
    question with each possible answer is one document; the documents of `scenes_per_row`
    questions share one packed row (documents never see each other), so a forward scores many."""
    encoder = MediaEncoder(ChatRenderer(tokenizer), image_processor)
    scenes = load_scenes(val_path)[:limit]
    model.eval()
    right = {"colour": [], "count": []}
    bar = progress(len(scenes), "eval", unit="image", leave=False)
    for first in range(0, len(scenes), scenes_per_row):
        chunk = scenes[first:first + scenes_per_row]
        docs = [encoder.encode(record(replace(scene, answer=a)), "val", val_path) for scene in chunk for a in scene.choices]
        lengths = torch.tensor([len(d.ids) for d in docs])
        row = collate_media([media_row(docs, int(lengths.sum()), tokenizer.pad_token_id, image_processor,
                                       encoder.pad_id)])
        logits = model(**model_inputs(row)).logits[0].float()
        targets = next_token_targets(row["labels"], row["cu_seqlens"])[0]
        token_loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
        per_doc = torch.zeros(len(docs)).index_add_(0, torch.repeat_interleave(torch.arange(len(docs)), lengths),
                                                    token_loss).tolist()
        for scene in chunk:
            losses, per_doc = per_doc[:len(scene.choices)], per_doc[len(scene.choices):]
            right[scene.kind].append(scene.choices[losses.index(min(losses))] == scene.answer)
        bar.update(len(chunk))
    bar.close()
    scored = right["colour"] + right["count"]
    chance = (len(right["colour"]) / 4 + len(right["count"]) / 3) / max(1, len(scored))
    return {"accuracy": sum(scored) / max(1, len(scored)), "chance": chance,
            **{kind: sum(r) / max(1, len(r)) for kind, r in right.items()}}


def _line(result: dict) -> str:
    return (f"{result['accuracy']:.1%} (colour {result['colour']:.1%}, count {result['count']:.1%})")


def run_image_default(cfg: RunConfig):
    """Generates the image task, trains on it, and reports held-out accuracy before and after."""
    directory = _builtin_dir(cfg) / "image_task"
    say(f"the built-in image task: {directory}")
    files = build_image_task(directory)
    cfg = replace(cfg, data=replace(cfg.data, train_path=str(files.train), val_path=str(files.val), val_fraction=0.0))
    torch.manual_seed(cfg.train.seed)  # the trainer draws the same initial weights from this seed
    untrained, tokenizer = build_model_and_tokenizer(cfg, Runtime(torch.device("cpu"), 0, 1, None))
    image_processor = load_image_processor(None, cfg.data.image_min_pixels, cfg.data.image_max_pixels)
    before = None
    if _is_rank_zero():
        say("evaluating the untrained model on the held-out images")
        before = image_task_accuracy(untrained, tokenizer, image_processor, files.val)
        say(f"training (untrained held-out accuracy {_line(before)}, chance {before['chance']:.1%})")
    del untrained
    result = train(cfg)
    if result.export_dir is None or not _is_rank_zero():
        return result
    trained = Qwen35ForConditionalGeneration.from_pretrained(result.export_dir)
    say("evaluating the trained model on the held-out images")
    after = image_task_accuracy(trained, tokenizer, image_processor, files.val)
    print(f"held-out accuracy: untrained {_line(before)} -> trained {_line(after)}; chance "
          f"{after['chance']:.1%} ({len(load_scenes(files.val))} images; model in {result.export_dir})")
    return result
