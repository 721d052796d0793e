"""transformers' own image processor for the vision-language model: never re-implemented here.

From a model directory it is `AutoImageProcessor` over its `preprocessor_config.json` (Qwen3.5's:
patch 16, temporal patch 2, 2x2 merge, mean and std 0.5, the pixel budget). For a random preset
(no directory) it is the same class built with Qwen3.5's settings. `data.image_min_pixels` /
`data.image_max_pixels` replace the budget either way. What it computes (resizing to multiples of
32, the patch order the tower assumes) is described in docs/vision.md.

The PIL backend is used: it needs nothing beyond Pillow (the torchvision backend gives the same
pixels and is picked by transformers when a checkpoint asks for it and torchvision is installed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Qwen3.5's preprocessor_config.json, for random presets (no model directory to read it from).
QWEN35_IMAGE_SETTINGS = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5], min_pixels=256 * 256, max_pixels=4096 * 4096)
# The files of a model directory that describe its processor (copied into exports as they are).
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


def load_image_processor(model_path: str | None, min_pixels: int | None = None, max_pixels: int | None = None):
    budget = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if model_path is not None:
        from transformers import AutoImageProcessor

        if not (Path(model_path).expanduser() / "preprocessor_config.json").is_file():
            raise ValueError(f"{model_path}: no preprocessor_config.json; a vision-language model directory "
                             "carries its image processor's settings there")
        return AutoImageProcessor.from_pretrained(Path(model_path).expanduser(), backend="pil", **budget)
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**{**QWEN35_IMAGE_SETTINGS, **budget})


def save_processor(image_processor, tokenizer, directory: Path, model_path: str | None) -> None:
    """The processor files next to an exported model (the tokenizer's are saved beside them):
    the model directory's own, copied as they are, or for a preset the image processor's
    `preprocessor_config.json`, which `AutoImageProcessor` loads. (Building a whole
    `Qwen3VLProcessor` needs its video processor, hence torchvision, which training does not.)"""
    source = Path(model_path).expanduser() if model_path else None
    copied = False
    for name in PROCESSOR_FILES:
        if source is not None and (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
            copied = True
    if not copied:
        image_processor.save_pretrained(directory)
