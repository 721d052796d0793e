"""Image-text training data: records with images, tokenised up front, pixels decoded per row.

Two record shapes carry images, next to every text shape of `qwen35.data.formats` (a record
without images is an ordinary text sample, so text-only and image sources mix in one run):

- OpenAI content parts: `{"messages": [{"role": "user", "content": [{"type": "image", "image":
  "cat.jpg"}, {"type": "text", "text": "What is this?"}]}, {"role": "assistant", ...}]}`
  (`"image_url": {"url": ...}` or a bare string path are read too);
- ShareGPT4V / LLaMA-Factory: `{"conversations": [{"from": "human", "value": "<image>\\n..."},
  ...], "images": ["cat.jpg"]}` with as many `<image>` tags as paths (ShareGPT4V's single
  `"image": "coco/train2017/...jpg"` is a one-path list).

Paths are relative to `data.media_root` when set, else to the data file's directory.

What is known before training, per document: its token ids, with each image's
`<|vision_start|><|image_pad|><|vision_end|>` expanded to as many pads as the image processor
will give that image (`image_processor.get_number_of_image_patches` of the header's size, over the
2x2 merge), the loss mask (assistant tokens, as for text; pads are never learned), and the image
paths. Each image file is opened and verified once here (header and checksums, no pixels kept): a
missing or corrupt image makes its record malformed, reported with file and line, or an error
under `on_malformed: error`. Pixels are decoded only when a row is built (`MediaPackedDataset`),
in the loader's worker processes when `data.num_workers` > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwen35.data.formats import MalformedRecord, Sample, _chat, to_sample
from qwen35.data.render import ChatRenderer
from qwen35.ops.cross_entropy import IGNORE_INDEX

IMAGE_TAG = "<image>"
IMAGE_PAD = "<|image_pad|>"


@dataclass
class MediaDocument:
    ids: np.ndarray  # int32 [n], image pads expanded
    loss: np.ndarray  # bool [n]
    images: tuple[str, ...]  # resolved paths, in order of appearance


def image_parts(record: Any, where: str) -> tuple[list[dict], list[str]] | None:
    """(messages with content parts, image paths) of a record that holds images; None for a
    record without any (read as text by `formats.to_sample`)."""
    def bad(reason: str) -> MalformedRecord:
        return MalformedRecord(f"{where}: {reason}")

    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return _openai(record["messages"], bad)
    images = record.get("images", record.get("image"))
    if isinstance(record.get("conversations"), list) and images:
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise bad("images must be a list of paths")
        return _sharegpt_with_images(record, images, where, bad)
    return None


def _openai(messages: list, bad) -> tuple[list[dict], list[str]] | None:
    out, paths = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind in ("image", "image_url"):
                path = part.get("image", part.get("image_url"))
                path = path.get("url") if isinstance(path, dict) else path
                if not isinstance(path, str) or not path:
                    raise bad("an image part needs a path in its 'image' (or 'image_url') field")
                paths.append(path.removeprefix("file://"))
                parts.append({"type": "image"})
            elif kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise bad(f"content part {part!r}: only text and image parts are supported")
        out.append({**message, "content": parts})
    return (out, paths) if paths else None


def _sharegpt_with_images(record: dict, images: list[str], where: str, bad) -> tuple[list[dict], list[str]]:
    text_only = to_sample({k: v for k, v in record.items() if k not in ("images", "image")}, where)
    tags = sum(m["content"].count(IMAGE_TAG) for m in text_only.messages)
    if tags != len(images):
        raise bad(f"{tags} {IMAGE_TAG} tags but {len(images)} images")
    messages = []
    for message in text_only.messages:
        pieces = message["content"].split(IMAGE_TAG)
        parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for piece in pieces[1:]:
            parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({**message, "content": parts})
    return messages, images


class MediaEncoder:
    """Records to `MediaDocument`s with one tokenizer, chat template and image processor."""

    def __init__(self, renderer: ChatRenderer, image_processor, media_root: str | None = None):
        self.renderer, self.image_processor, self.media_root = renderer, image_processor, media_root
        self.pad_id = renderer.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.merge = image_processor.merge_size ** 2

    def encode(self, record: Any, where: str, data_file: Path) -> MediaDocument:
        """MalformedRecord (naming `where`) for a record that cannot be used."""
        found = image_parts(record, where)
        if found is None:
            ids, loss = self.renderer.encode(to_sample(record, where))
            return MediaDocument(ids, loss, ())
        messages, paths = found
        # the text model's rules for roles and turns, checked on the text of the conversation
        _chat([{**m, "content": _text_of(m.get("content"))} for m in messages],
              lambda reason: MalformedRecord(f"{where}: {reason}"))
        root = Path(self.media_root).expanduser() if self.media_root else data_file.parent
        resolved = [str(root / p) for p in paths]
        counts = [self._image_tokens(p, i, where) for i, p in enumerate(resolved)]
        ids, loss = self.renderer.encode(Sample(where, messages=messages))
        pads = np.flatnonzero(ids == self.pad_id)
        if len(pads) != len(paths):
            raise MalformedRecord(f"{where}: the chat template wrote {len(pads)} image pads for {len(paths)} images")
        repeat = image_pad_repeats(ids, self.pad_id, counts)
        loss = np.repeat(loss, repeat)
        loss[np.repeat(ids == self.pad_id, repeat)] = False  # image features are inputs, never targets
        return MediaDocument(np.repeat(ids, repeat), loss, tuple(resolved))

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


def image_pad_repeats(ids: np.ndarray, pad_id: int, counts) -> np.ndarray:
    """How many tokens each token of `ids` becomes (`np.repeat`): the chat template writes one
    `<|image_pad|>` per image, which stands for `counts[i]` pads, the image's tokens after the
    2x2 merge; every other token stays one."""
    repeat = np.ones(len(ids), dtype=np.int64)
    repeat[ids == pad_id] = counts
    return repeat


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


def media_row(docs: list[MediaDocument], seq_len: int, pad_id: int, image_processor,
              image_token_id: int) -> dict[str, torch.Tensor]:
    """One packed row of `docs`: as `pack.PackedDataset` rows, plus `pixel_values` and
    `image_grid_thw` of its images (decoded now) and M-RoPE positions `[3, seq_len]` that restart
    at every document (`qwen35.model.vl.mrope_positions`)."""
    from qwen35.model.vl import mm_token_types, mrope_positions

    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    bounds, paths = [0], []
    for doc in docs:
        t, n = bounds[-1], len(doc.ids)
        ids[t:t + n] = doc.ids
        labels[t:t + n] = np.where(doc.loss, doc.ids, IGNORE_INDEX)
        bounds.append(t + n)
        paths += doc.images
    if bounds[-1] < seq_len:  # the padding segment
        bounds.append(seq_len)
    input_ids = torch.from_numpy(ids)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    row = {"input_ids": input_ids, "labels": torch.from_numpy(labels), "cu_seqlens": cu_seqlens}
    grid = None
    if paths:
        pixels = image_processor(images=load_images(tuple(paths)), return_tensors="pt")
        row["pixel_values"], grid = pixels["pixel_values"], pixels["image_grid_thw"]
        row["image_grid_thw"] = grid
    types = mm_token_types(input_ids[None], image_token_id, -1)
    row["position_ids"] = mrope_positions(types, grid, None, image_processor.merge_size, cu_seqlens)[:, 0]
    return row


def collate_media(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows → one packed row `[1, total]` (positions `[3, 1, total]`), the images of all rows
    concatenated in row order: the vision tower runs once per micro-batch."""
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
    with_images = [r for r in rows if "pixel_values" in r]
    if with_images:
        batch["pixel_values"] = torch.cat([r["pixel_values"] for r in with_images])
        batch["image_grid_thw"] = torch.cat([r["image_grid_thw"] for r in with_images])
    return batch
