"""The vision-language workload of `bench_train.py`: image-text documents, packed into one row for
ours, the same documents as a padded batch for transformers (one sample per row: what a TRL
user gets, since TRL does not pack vision-language data), the same images for both.

A document is one image and its text: `PROMPT` text tokens, `<|vision_start|>`, the image's pad
tokens (one per 2x2 block of 16-pixel patches: 196 for 448x448 pixels), `<|vision_end|>`, then
the rest of the text. Image sides and text lengths vary around `image_px` and `text_tokens` (a
fixed, repeatable mix); documents are added while they fit, and the last document's text fills
the row to exactly `seq_len` tokens. Pixels are random values in [-1, 1] (the processor's range
after its 0.5 mean / std normalisation), the same tensor for both systems.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from qwen35.model.config import Qwen35VLConfig
from qwen35.model.vl import mm_token_types, mrope_positions
from qwen35.ops.cross_entropy import IGNORE_INDEX
from qwen35.train.flops import step_flops, vision_flops

PROMPT = 4  # text tokens before the image, as "<|im_start|>user\n" renders


@dataclass
class VLDocument:
    grid: tuple[int, int, int]  # the image's patch grid (frames / 2, height / 16, width / 16)
    text: int  # text tokens, the prompt's included
    image_tokens: int  # pads after the 2x2 merge

    @property
    def length(self) -> int:
        return self.text + self.image_tokens + 2  # + vision start and end


def vl_documents(config: Qwen35VLConfig, seq_len: int, image_px: int, text_tokens: int) -> list[VLDocument]:
    """The documents of one row of `seq_len` tokens (see the module docstring)."""
    vision = config.vision
    unit = vision.patch_size * vision.spatial_merge_size  # the processor's sides are multiples of 32
    docs, used = [], 0
    for i in itertools.count():
        h = max(unit, round(image_px * (1 + 0.25 * math.sin(1.3 * i + 0.5)) / unit) * unit)
        w = max(unit, round(image_px * (1 + 0.25 * math.cos(0.9 * i)) / unit) * unit)
        grid = (1, h // vision.patch_size, w // vision.patch_size)  # a still image is one frame pair
        text = max(PROMPT + 1, round(text_tokens * (1 + 0.5 * math.sin(1.7 * i + 0.4))))
        doc = VLDocument(grid, text, h * w // unit**2)
        if used + doc.length > seq_len:
            break
        docs.append(doc)
        used += doc.length
    if not docs:
        raise ValueError(f"--seq-lens {seq_len}: not even one document of a ~{image_px}-pixel image and "
                         f"{text_tokens} text tokens fits a row")
    docs[-1].text += seq_len - used
    return docs


class VLWorkload:
    """One row's documents with their token ids and pixels, as ours and the peer take them."""

    def __init__(self, config: Qwen35VLConfig, seq_len: int, image_px: int, text_tokens: int):
        self.config = config
        self.docs = vl_documents(config, seq_len, image_px, text_tokens)
        self.lengths = [d.length for d in self.docs]
        gen = torch.Generator().manual_seed(0)
        # text ids below every media id (the Qwen3.5 vocabulary puts its special tokens at the top)
        media_ids = (config.image_token_id, config.video_token_id, config.vision_start_token_id,
                     config.vision_end_token_id)
        high = min(config.vocab_size, *media_ids)
        self.doc_ids = []
        for d in self.docs:
            text = torch.randint(0, high, (d.text,), generator=gen)
            self.doc_ids.append(torch.cat([
                text[:PROMPT], torch.tensor([config.vision_start_token_id]),
                torch.full((d.image_tokens,), config.image_token_id), torch.tensor([config.vision_end_token_id]),
                text[PROMPT:]]))
        self.grid_thw = torch.tensor([d.grid for d in self.docs])
        v = config.vision
        patches = int(self.grid_thw.prod(-1).sum())
        self.pixel_values = torch.rand(patches, v.in_channels * v.temporal_patch_size * v.patch_size**2,
                                       generator=gen) * 2 - 1

    @property
    def image_tokens(self) -> int:
        return sum(d.image_tokens for d in self.docs)

    def flops(self) -> float:
        """Model FLOPs of one training step: the language model over every token of the documents
        (image tokens included), plus the vision tower over every image (`qwen35.train.flops`)."""
        return step_flops(self.config.text_config(), self.lengths) + vision_flops(self.config.vision, self.grid_thw)

    def _labels(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.masked_fill(ids == self.config.image_token_id, IGNORE_INDEX)  # image pads are no targets

    def packed(self, device) -> dict:
        """Ours: one row `[1, T]` with `cu_seqlens`, M-RoPE positions restarting per document
        (computed here, as the trainer's data loader does), every image of the row for one pass of
        the vision tower."""
        ids = torch.cat(self.doc_ids)[None]
        cu = torch.tensor([0, *self.lengths]).cumsum(0).to(torch.int32)
        types = mm_token_types(ids, self.config.image_token_id, self.config.video_token_id)
        positions = mrope_positions(types, self.grid_thw, None, self.config.vision.spatial_merge_size, cu)
        batch = dict(input_ids=ids, labels=self._labels(ids), position_ids=positions, cu_seqlens=cu,
                     pixel_values=self.pixel_values, image_grid_thw=self.grid_thw)
        return {k: v.to(device) for k, v in batch.items()}

    def padded(self, device) -> dict:
        """The peer: one document per row, right-padded to the longest, with the attention mask and
        `mm_token_type_ids` transformers' processor and collator give."""
        ids = torch.zeros(len(self.docs), max(self.lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, doc in enumerate(self.doc_ids):
            ids[row, :len(doc)] = doc
            mask[row, :len(doc)] = 1
        batch = dict(input_ids=ids, attention_mask=mask, labels=self._labels(ids).masked_fill(mask == 0, IGNORE_INDEX),
                     mm_token_type_ids=mm_token_types(ids, self.config.image_token_id, self.config.video_token_id),
                     pixel_values=self.pixel_values, image_grid_thw=self.grid_thw)
        return {k: v.to(device) for k, v in batch.items()}
