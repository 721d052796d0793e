"""Image- and video-text training data: records with media, tokenised up front, pixels decoded
per row.

Two record shapes carry media, next to every text shape of `qwen35.data.formats` (a record
without media is an ordinary text sample, so text-only and media sources mix in one run):

- OpenAI content parts: `{"messages": [{"role": "user", "content": [{"type": "image", "image":
  "cat.jpg"}, {"type": "video", "video": "walk.mp4"}, {"type": "text", "text": "What is this?"}]},
  {"role": "assistant", ...}]}` (`"image_url": {"url": ...}`, `"video_url"` or a bare string
  path are read too);
- ShareGPT4V / LLaMA-Factory: `{"conversations": [{"from": "human", "value": "<image>\\n..."},
  ...], "images": ["cat.jpg"], "videos": ["walk.mp4"]}` with as many `<image>` / `<video>` tags as
  paths (ShareGPT4V's single `"image": "coco/train2017/...jpg"` is a one-path list).

Paths are relative to `data.media_root` when set, else to the data file's directory.

What is known before training, per document: its token ids, with each image's
`<|vision_start|><|image_pad|><|vision_end|>` expanded to as many pads as the image processor
will give that image (`image_processor.get_number_of_image_patches` of the header's size, over the
2x2 merge) and each video's `<|video_pad|>` replaced by the video processor's timestamped runs of
pads (`qwen35.data.video`), the loss mask (assistant tokens, as for text; media tokens are never
learned), and the media paths. Each image file is opened and verified once here (header and
checksums, no pixels kept), each video's header read: a missing or corrupt file makes its record
malformed, reported with file and line, or an error under `on_malformed: error`. Pixels are
decoded only when a row is built (`MediaPackedDataset`), in the loader's worker processes when
`data.num_workers` > 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwen35.data.formats import DataError, MalformedRecord, Sample, _chat, to_sample
from qwen35.data.render import ChatRenderer
from qwen35.data.video import VIDEO_PAD, VideoClip, video_clip, video_pixels, video_placeholder
from qwen35.ops.cross_entropy import IGNORE_INDEX

IMAGE_TAG, VIDEO_TAG = "<image>", "<video>"
IMAGE_PAD = "<|image_pad|>"
KINDS = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}


@dataclass
class MediaDocument:
    ids: np.ndarray  # int32 [n], media placeholders expanded
    loss: np.ndarray  # bool [n]
    images: tuple[str, ...]  # resolved paths, in order of appearance
    videos: tuple[VideoClip, ...] = ()  # in order of appearance


def media_parts(record: Any, where: str) -> tuple[list[dict], list[str], list[str]] | None:
    """(messages with content parts, image paths, video paths) of a record that holds images or
    videos; None for a record without any (read as text by `formats.to_sample`)."""
    def bad(reason: str) -> MalformedRecord:
        return MalformedRecord(f"{where}: {reason}")

    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return _openai(record["messages"], bad)
    if not isinstance(record.get("conversations"), list):
        return None
    lists = {}
    for kind, keys in (("image", ("images", "image")), ("video", ("videos", "video"))):
        paths = next((record[k] for k in keys if record.get(k)), [])
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise bad(f"{keys[0]} must be a list of paths")
        lists[kind] = paths
    return _sharegpt_with_media(record, lists, where, bad) if lists["image"] or lists["video"] else None


def _openai(messages: list, bad) -> tuple[list[dict], list[str], list[str]] | None:
    out, paths = [], {"image": [], "video": []}
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind in KINDS:
                kind = KINDS[kind]
                path = part.get(kind, part.get(f"{kind}_url"))
                path = path.get("url") if isinstance(path, dict) else path
                if not isinstance(path, str) or not path:
                    raise bad(f"a {kind} part needs a path in its '{kind}' (or '{kind}_url') field")
                paths[kind].append(path.removeprefix("file://"))
                parts.append({"type": kind})
            elif kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise bad(f"content part {part!r}: only text, image and video parts are supported")
        out.append({**message, "content": parts})
    return (out, paths["image"], paths["video"]) if paths["image"] or paths["video"] else None


def _sharegpt_with_media(record: dict, lists: dict[str, list[str]], where: str,
                         bad) -> tuple[list[dict], list[str], list[str]]:
    text_only = to_sample({k: v for k, v in record.items() if k not in ("images", "image", "videos", "video")}, where)
    for kind, tag in (("image", IMAGE_TAG), ("video", VIDEO_TAG)):
        tags = sum(m["content"].count(tag) for m in text_only.messages)
        if tags != len(lists[kind]):
            raise bad(f"{tags} {tag} tags but {len(lists[kind])} {kind}s")
    messages = []
    for message in text_only.messages:
        parts = []
        for piece in re.split(f"({IMAGE_TAG}|{VIDEO_TAG})", message["content"]):
            if piece in (IMAGE_TAG, VIDEO_TAG):
                parts.append({"type": piece[1:-1]})
            elif piece:
                parts.append({"type": "text", "text": piece})
        messages.append({**message, "content": parts})
    return messages, lists["image"], lists["video"]


class MediaEncoder:
    """Records to `MediaDocument`s with one tokenizer, chat template, image processor and (for
    data with videos) video processor."""

    def __init__(self, renderer: ChatRenderer, image_processor, media_root: str | None = None,
                 video_processor=None):
        self.renderer, self.image_processor, self.media_root = renderer, image_processor, media_root
        self.video_processor = video_processor
        self.pad_id = renderer.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_pad_id = renderer.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        self.merge = image_processor.merge_size ** 2

    def encode(self, record: Any, where: str, data_file: Path) -> MediaDocument:
        """MalformedRecord (naming `where`) for a record that cannot be used."""
        found = media_parts(record, where)
        if found is None:
            ids, loss = self.renderer.encode(to_sample(record, where))
            return MediaDocument(ids, loss, ())
        messages, image_paths, video_paths = found
        # the text model's rules for roles and turns, checked on the text of the conversation
        _chat([{**m, "content": _text_of(m.get("content"))} for m in messages],
              lambda reason: MalformedRecord(f"{where}: {reason}"))
        root = Path(self.media_root).expanduser() if self.media_root else data_file.parent
        images = [str(root / p) for p in image_paths]
        counts = [self._image_tokens(p, i, where) for i, p in enumerate(images)]
        clips = [self._video_clip(str(root / p), i, where) for i, p in enumerate(video_paths)]
        ids, loss = self.renderer.encode(Sample(where, messages=messages))
        for pad, n, kind in ((self.pad_id, len(images), "image"), (self.video_pad_id, len(clips), "video")):
            if int((ids == pad).sum()) != n:
                raise MalformedRecord(f"{where}: the chat template wrote {int((ids == pad).sum())} {kind} pads "
                                      f"for {n} {kind}s")
        videos = [self.renderer.backend.encode(video_placeholder(c, self.video_processor), add_special_tokens=False).ids
                  for c in clips]
        ids, loss = expand_placeholders(ids, loss, self.pad_id, counts, self.video_pad_id, videos)
        return MediaDocument(ids, loss, tuple(images), tuple(clips))

    def _image_tokens(self, path: str, i: int, where: str) -> int:
        """The image's `<|image_pad|>` count, from its header; the file is verified, not decoded."""
        try:
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, SyntaxError, ValueError) as e:
            raise MalformedRecord(f"{where}: image {i} ({path}): {e}") from None
        return self.image_processor.get_number_of_image_patches(height, width, {}) // self.merge

    def _video_clip(self, path: str, i: int, where: str) -> VideoClip:
        if self.video_processor is None:
            raise DataError(f"{where}: video {i} ({path}): the model directory has no video_preprocessor_config.json "
                            "to prepare videos with")
        try:
            return video_clip(path, self.video_processor)
        except OSError as e:
            raise MalformedRecord(f"{where}: video {i} ({path}): {e}") from None


def expand_placeholders(ids: np.ndarray, loss: np.ndarray, image_pad: int, image_counts, video_pad: int = -1,
                        video_pieces=()) -> tuple[np.ndarray, np.ndarray]:
    """The chat template writes one `<|image_pad|>` per image, which stands for `image_counts[i]`
    pads (the image's tokens after the 2x2 merge), and one `<|video_pad|>` per video, which the
    processor replaces by `video_pieces[i]` (token ids: per frame pair a timestamp and a run of
    pads). Media tokens are inputs, never targets."""
    at = np.flatnonzero((ids == image_pad) | (ids == video_pad))
    images, videos = iter(image_counts), iter(video_pieces)
    out_ids, out_loss, start = [], [], 0
    for i in at:
        piece = np.full(next(images), image_pad) if ids[i] == image_pad else np.asarray(next(videos))
        out_ids += [ids[start:i], piece.astype(ids.dtype)]
        out_loss += [loss[start:i], np.zeros(len(piece), dtype=bool)]
        start = i + 1
    return np.concatenate(out_ids + [ids[start:]]), np.concatenate(out_loss + [loss[start:]])


def _text_of(content: Any) -> Any:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content)
    return content


def load_images(paths: tuple[str, ...]) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as e:
            raise OSError(f"image {path} could not be decoded: {e}") from None
    return images


def media_row(docs: list[MediaDocument], seq_len: int, pad_id: int, image_processor, image_token_id: int,
              video_processor=None, video_token_id: int = -1) -> dict[str, torch.Tensor]:
    """One packed row of `docs`: as `pack.PackedDataset` rows, plus `pixel_values` /
    `image_grid_thw` of its images and `pixel_values_videos` / `video_grid_thw` of its videos
    (decoded now) and M-RoPE positions `[3, seq_len]` that restart at every document
    (`qwen35.model.vl.mrope_positions`)."""
    from qwen35.model.vl import mm_token_types, mrope_positions

    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    bounds, paths, clips = [0], [], []
    for doc in docs:
        t, n = bounds[-1], len(doc.ids)
        ids[t:t + n] = doc.ids
        labels[t:t + n] = np.where(doc.loss, doc.ids, IGNORE_INDEX)
        bounds.append(t + n)
        paths += doc.images
        clips += doc.videos
    if bounds[-1] < seq_len:  # the padding segment
        bounds.append(seq_len)
    input_ids = torch.from_numpy(ids)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    row = {"input_ids": input_ids, "labels": torch.from_numpy(labels), "cu_seqlens": cu_seqlens}
    if paths:
        pixels = image_processor(images=load_images(tuple(paths)), return_tensors="pt")
        row["pixel_values"], row["image_grid_thw"] = pixels["pixel_values"], pixels["image_grid_thw"]
    if clips:
        row.update(video_pixels(clips, video_processor))
    types = mm_token_types(input_ids[None], image_token_id, video_token_id)
    row["position_ids"] = mrope_positions(types, row.get("image_grid_thw"), row.get("video_grid_thw"),
                                          image_processor.merge_size, cu_seqlens)[:, 0]
    return row


def collate_media(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows → one packed row `[1, total]` (positions `[3, 1, total]`), the images and videos of
    all rows concatenated in row order: the vision tower runs once per micro-batch."""
    bounds, start = [rows[0]["cu_seqlens"][:1]], 0
    for row in rows:
        bounds.append(row["cu_seqlens"][1:] + start)
        start += row["input_ids"].numel()
    batch = {
        "input_ids": torch.cat([r["input_ids"] for r in rows])[None],
        "labels": torch.cat([r["labels"] for r in rows])[None],
        "position_ids": torch.cat([r["position_ids"] for r in rows], dim=-1)[:, None],
        "cu_seqlens": torch.cat(bounds).to(torch.int32),
    }
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        with_media = [r for r in rows if pixels in r]
        if with_media:
            batch[pixels] = torch.cat([r[pixels] for r in with_media])
            batch[grid] = torch.cat([r[grid] for r in with_media])
    return batch
