"""`qwen35 export`: a resumable checkpoint -> the Hugging Face directory the trainer's own export
would have written from the same weights.

A checkpoint holds only what was trained (every weight, or only the adapters); the rest comes
from the run: its `run_config.yaml` names the model source and the tokenizer, and `run.json` the
working directory its relative paths start from. So the model is built as the trainer builds it
(on this CPU, one process, whatever layout the run had), the checkpoint's weights are read into
it (DCP reshards a checkpoint of any number of ranks), and the trainer's `export_model` writes
full weights or a PEFT adapter, atomically; a vision-language run's export also carries its image
processor, built as the trainer builds it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from qwen35.build import build_model, is_vision_language, load_tokenizer
from qwen35.errors import UserError
from qwen35.train import checkpoint as ckpt
from qwen35.train import guards, rundir
from qwen35.train.config import ParallelConfig, RunConfig
from qwen35.train.config_parser import load_run_config
from qwen35.train.setup import (Runtime, export_model, run_image_processor, run_video_processor,
                                use_run_chat_template)


def export_checkpoint(checkpoint: Path, output: Path, overwrite: bool = False, say=print) -> Path:
    """Exports `checkpoint` (a checkpoint, or a run's output directory: its latest complete one)
    to `output`; returns the checkpoint exported."""
    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"--output {output} already exists; choose another directory or pass --overwrite")
    path = rundir.checkpoints_at(checkpoint, key="--checkpoint")[0]
    if not (path / ".metadata").is_file() or not (path / "trainer_state.pt").is_file():
        raise UserError(f"checkpoint {path} is incomplete: it lacks "
                        f"{'.metadata' if not (path / '.metadata').is_file() else 'trainer_state.pt'}")
    cfg = _run_config(path)
    rt = Runtime(torch.device("cpu"), 0, 1, None)
    tokenizer = load_tokenizer(cfg)
    use_run_chat_template(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed)  # adapters start as the trainer's did, before the checkpoint overwrites them
    model = build_model(cfg, rt, tokenizer)
    ckpt.load_model_weights(path, model)
    if not guards.weights_are_finite(model, rt.device):
        raise UserError(f"checkpoint {path} holds non-finite weights; export an earlier one")
    vision = is_vision_language(cfg)
    image_processor, video_processor = (run_image_processor(cfg), run_video_processor(cfg)) if vision else (None, None)
    with ckpt.atomic_directory(output) as partial:
        export_model(model, tokenizer, partial, rt, image_processor, cfg.model.path, video_processor)
    say(f"exported {path} to {output}" + (" (a PEFT adapter)" if cfg.lora.rank else ""))
    return path


def _run_config(path: Path) -> RunConfig:
    """The config of the run that wrote the checkpoint at `path` (`OUT/checkpoints/step_N`), laid
    out for one process on this CPU, its relative paths resolved where the run started."""
    out_dir = path.parent.parent
    saved = out_dir / "run_config.yaml"
    if path.parent.name != "checkpoints" or not saved.is_file():
        raise UserError(f"checkpoint {path}: no run_config.yaml in {out_dir}; a checkpoint is exported from "
                        "its run's output directory (OUT/checkpoints/step_NNNNNNNN)")
    cfg = load_run_config(saved, [])
    base = rundir.working_dir(out_dir)

    def resolved(value: str | None) -> str | None:
        return None if value is None else str(base / value)  # an absolute value stays as it is

    return replace(
        cfg,
        model=replace(cfg.model, path=resolved(cfg.model.path)),
        data=replace(cfg.data, chat_template=resolved(cfg.data.chat_template)),
        train=replace(cfg.train, output_dir=str(out_dir), compile=False, activation_checkpointing="none"),
        optim=replace(cfg.optim, cpu_offload=False),
        parallel=ParallelConfig(),
    )
