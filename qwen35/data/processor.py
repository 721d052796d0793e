"""transformers' own image and video processors for the vision-language model: never re-implemented here.

From a model directory it is `AutoImageProcessor` over its `preprocessor_config.json` (Qwen3.5's:
patch 16, temporal patch 2, 2x2 merge, mean and std 0.5, the pixel budget). For a random preset
(no directory) it is the same class built with Qwen3.5's settings. `data.image_min_pixels` /
`data.image_max_pixels` replace the budget either way. What it computes (resizing to multiples of
32, the patch order the tower assumes) is described in docs/vision.md.

The video processor is `Qwen3VLVideoProcessor` over `video_preprocessor_config.json` (its frame
rate, frame cap and whole-clip pixel budget replaced by `data.video_fps`, `data.video_max_frames`,
`data.video_min_pixels` / `data.video_max_pixels`); how it is used without torchvision is in
`qwen35.data.video`.

The PIL backend is used: it needs nothing beyond Pillow (the torchvision backend gives the same
pixels and is picked by transformers when a checkpoint asks for it and torchvision is installed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Qwen3.5's preprocessor_config.json, for random presets (no model directory to read it from).
QWEN35_IMAGE_SETTINGS = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5], min_pixels=256 * 256, max_pixels=4096 * 4096)
# Qwen3.5's video_preprocessor_config.json, for random presets.
QWEN35_VIDEO_SETTINGS = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5], size={"shortest_edge": 4096, "longest_edge": 25165824},
                             fps=2, min_frames=4, max_frames=768)
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


def load_video_processor(model_path: str | None, fps: float | None = None, max_frames: int | None = None,
                         min_pixels: int | None = None, max_pixels: int | None = None):
    """The model directory's `Qwen3VLVideoProcessor` (Qwen3.5's settings for a preset), with the
    run's frame rate, frame cap and pixel budget; None for a directory without
    `video_preprocessor_config.json` (its data may not hold videos)."""
    # the class from its module: transformers' top-level name stands in for it when torchvision is
    # missing, and refuses to build
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    settings = {k: v for k, v in (("fps", fps), ("max_frames", max_frames)) if v is not None}
    if model_path is not None:
        if not (Path(model_path).expanduser() / "video_preprocessor_config.json").is_file():
            return None
        processor = Qwen3VLVideoProcessor.from_pretrained(Path(model_path).expanduser(), **settings)
    else:
        processor = Qwen3VLVideoProcessor(**{**QWEN35_VIDEO_SETTINGS, **settings})
    if min_pixels is not None or max_pixels is not None:
        processor.size = {"shortest_edge": min_pixels or processor.size["shortest_edge"],
                          "longest_edge": max_pixels or processor.size["longest_edge"]}
    return processor


def save_processor(image_processor, tokenizer, directory: Path, model_path: str | None,
                   video_processor=None) -> None:
    """The processor files next to an exported model (the tokenizer's are saved beside them):
    the model directory's own, copied as they are, or for a preset the image processor's
    `preprocessor_config.json`, which `AutoImageProcessor` loads, and the video processor's
    `video_preprocessor_config.json`."""
    source = Path(model_path).expanduser() if model_path else None
    copied = False
    for name in PROCESSOR_FILES:
        if source is not None and (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
            copied = True
    if not copied:
        image_processor.save_pretrained(directory)
        if video_processor is not None:
            video_processor.save_pretrained(directory)
