"""The Qwen3.5 vision-language model (early fusion), single device.

`model.visual` turns the images and videos of a batch into language-width tokens; they replace
the embeddings of the `<|image_pad|>` / `<|video_pad|>` tokens; `model.language_model` (the
text model, dense or MoE) runs on the result with 3-D M-RoPE positions. Parameter names are
transformers' `Qwen3_5(Moe)ForConditionalGeneration` names: `model.visual.*`,
`model.language_model.*`, `lm_head.weight`.

Packed rows work as for text: one row `[1, T]` with `cu_seqlens`; every document's M-RoPE
positions start at 0, and the GDN state, the conv and attention stay within a document.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen35.model.cache import InferenceCache
from qwen35.model.config import Qwen35VLConfig
from qwen35.model.model import CausalLMOutput, Qwen35ForCausalLM, Qwen35Model, causal_lm_output
from qwen35.model.vision import VisionModel

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids, as the processor writes them


def mm_token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """`mm_token_type_ids` as transformers' processor derives them from the token ids: 1 on
    image pads, 2 on video pads, 0 elsewhere."""
    return (input_ids == image_token_id).long() + 2 * (input_ids == video_token_id).long()


def mrope_positions(mm_token_type_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None,
                    spatial_merge_size: int = 2, cu_seqlens=None) -> torch.Tensor:
    """M-RoPE positions `[3, B, T]` (temporal, height, width) of a batch or a packed row.

    A text token gets its running position on all three axes. A run of media tokens is one
    image, or one frame of a video (the processor writes each frame between its own timestamp
    and vision start/end tokens): its merged `h x w` grid gets `(start, start + row,
    start + column)`, and the text after it continues at `start + max(h, w)`. Images and video
    frames take their grids in order of appearance, over the whole batch. With `cu_seqlens`
    (a packed row) positions restart at 0 at every document start. transformers computes the
    same in `Qwen3_5Model.get_rope_index` (for one document per row).

    Computed on the CPU (a loop over runs; on the GPU every step would wait for the device),
    returned on the device of `mm_token_type_ids`. A data loader can call it per row instead.
    """
    batch, length = mm_token_type_ids.shape
    out_device, device = mm_token_type_ids.device, torch.device("cpu")
    mm_token_type_ids = mm_token_type_ids.cpu()
    grids = {
        IMAGE: iter([] if image_grid_thw is None else image_grid_thw.tolist()),
        # one grid per frame: [t, h, w] -> t times [1, h, w]
        VIDEO: iter([] if video_grid_thw is None else
                    [[1, h, w] for t, h, w in video_grid_thw.tolist() for _ in range(t)]),
    }
    starts = torch.zeros(length, dtype=torch.bool, device=device)
    starts[0] = True
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"a packed row (cu_seqlens) must be passed as a batch of one, got batch {batch}")
        starts[cu_seqlens[:-1].long().cpu().clamp(max=length - 1)] = True
    positions = torch.zeros(3, batch, length, dtype=torch.long, device=device)
    for b in range(batch):
        types = mm_token_type_ids[b]
        boundary = starts.clone()
        boundary[1:] |= types[1:] != types[:-1]
        bounds = boundary.nonzero().flatten().tolist() + [length]
        next_position = 0
        for begin, end in zip(bounds[:-1], bounds[1:]):
            if starts[begin]:
                next_position = 0
            kind = int(types[begin])
            if kind == TEXT:
                positions[:, b, begin:end] = torch.arange(next_position, next_position + end - begin, device=device)
                next_position += end - begin
                continue
            name = "image" if kind == IMAGE else "video"
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"row {b} has more {name} token runs than {name}_grid_thw has {name}s"
                                 + (" (frames)" if kind == VIDEO else ""))
            t, h, w = grid[0], grid[1] // spatial_merge_size, grid[2] // spatial_merge_size
            if end - begin != t * h * w:
                raise ValueError(f"row {b}: a run of {end - begin} {name} tokens at position {begin}, but its grid "
                                 f"{grid} gives {t * h * w} tokens (t*h*w / {spatial_merge_size}²)")
            tt, hh, ww = torch.meshgrid(*(torch.arange(n, device=device) for n in (t, h, w)), indexing="ij")
            positions[:, b, begin:end] = torch.stack([tt, hh, ww]).flatten(1) + next_position
            next_position += max(h, w)
    return positions.to(out_device)


def position_offsets(position_ids: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
    """Per sequence of `position_ids [3, B, T]` (or per document of a packed row), its largest
    position + 1 - its length: where the text after it continues, relative to its length
    (transformers' `rope_deltas`; 0 for text, negative once an image spans several rows and columns)."""
    top = position_ids.amax(0)  # [B, T]
    if cu_seqlens is None:
        return top.amax(-1) + 1 - top.shape[-1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(top.device)
    document = torch.repeat_interleave(torch.arange(len(lengths), device=top.device), lengths)
    largest = top.new_zeros(len(lengths)).scatter_reduce(0, document, top[0, :len(document)], "amax")
    return largest + 1 - lengths


class Qwen35VLModel(nn.Module):
    """`model.*` of the checkpoint: the vision tower and the language model."""

    def __init__(self, config: Qwen35VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionModel(config.vision)
        self.language_model = Qwen35Model(config)
        # Under FSDP every rank must run the tower's collectives, also when its batch holds no
        # image (else the ranks with images wait forever): the data-parallel wrapper sets this,
        # and a batch without media then runs the tower on one blank 2x2 patch, weighted by zero.
        self.run_vision_without_media = False

    def embed(self, input_ids, media: list[tuple]) -> torch.Tensor:
        """Token embeddings with the media pads replaced by the vision tower's outputs.

        `media` holds `(pixel_values, grid_thw, pad token id)` per kind present; the tower runs
        once over all of them (its attention is per frame, so batching media changes nothing).
        """
        embeds = self.language_model.embed_tokens(input_ids)
        if not media and self.run_vision_without_media:
            v = self.config.vision
            merge = v.spatial_merge_size
            blank = embeds.new_zeros(merge * merge, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
            grid = torch.tensor([[1, merge, merge]], device=input_ids.device)
            return embeds + 0 * self.visual(blank, grid).sum().to(embeds.dtype)
        if not media:
            return embeds
        features = self.visual(torch.cat([m[0] for m in media]), torch.cat([m[1] for m in media]))
        merge = self.config.vision.spatial_merge_size ** 2
        sizes = [int(m[1].prod(-1).sum()) // merge for m in media]
        for (_, _, token), part in zip(media, features.split(sizes)):
            pads = input_ids == token
            if int(pads.sum()) != part.shape[0]:
                name = "image" if token == self.config.image_token_id else "video"
                raise ValueError(f"input_ids hold {int(pads.sum())} {name} pad tokens (id {token}) but the "
                                 f"{name} grids give {part.shape[0]} {name} tokens")
            embeds = embeds.masked_scatter(pads[..., None], part.to(embeds.dtype))
        return embeds

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                video_grid_thw=None, mm_token_type_ids=None, position_ids=None, cu_seqlens=None,
                router_logits: list | None = None, cache: InferenceCache | None = None):
        """With `cache` (generation, `qwen35.generate`): the prompts' forward records each
        sequence's `position_offsets` in the cache, and every later step's tokens continue from
        there (text after an image goes on at its largest position + 1, as in transformers)."""
        media = [(pixels, grid, token) for pixels, grid, token in (
            (pixel_values, image_grid_thw, self.config.image_token_id),
            (pixel_values_videos, video_grid_thw, self.config.video_token_id),
        ) if pixels is not None]
        if any(grid is None for _, grid, _ in media):
            raise ValueError("pixel_values / pixel_values_videos need their image_grid_thw / video_grid_thw")
        embeds = self.embed(input_ids, media)
        if position_ids is None and media:
            if mm_token_type_ids is None:
                mm_token_type_ids = mm_token_types(input_ids, self.config.image_token_id, self.config.video_token_id)
            position_ids = mrope_positions(mm_token_type_ids, image_grid_thw, video_grid_thw,
                                           self.config.vision.spatial_merge_size, cu_seqlens)
            if cache is not None:
                cache.position_offsets = position_offsets(position_ids, cu_seqlens).to(cache.lengths.device)
        elif position_ids is None and cache is not None and cu_seqlens is None:
            start = cache.lengths + cache.position_offsets
            position_ids = start[:, None] + torch.arange(input_ids.shape[1], device=start.device)
        elif position_ids is not None and position_ids.ndim == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]  # transformers' layout: the text row first, then t, h, w
        return self.language_model(input_ids, position_ids, cu_seqlens, cache=cache, router_logits=router_logits,
                                   inputs_embeds=embeds)


class Qwen35ForConditionalGeneration(nn.Module):
    """The vision-language model with its head; dense or MoE language model by the config.

    Construction, dtype handling and checkpoints follow the text model's rules
    (`Qwen35ForCausalLM`): the same float32-kept parameters, the same loader and writer.
    """

    config_class = Qwen35VLConfig

    def __init__(self, config: Qwen35VLConfig):
        super().__init__()
        self.config = config
        self.model = Qwen35VLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                video_grid_thw=None, mm_token_type_ids=None, position_ids=None, cu_seqlens=None,
                labels=None) -> CausalLMOutput:
        """Logits, or with `labels` the loss, as `Qwen35ForCausalLM.forward`. The media inputs
        have the names and shapes transformers' processor returns; `position_ids` (`[3, B, T]`,
        or transformers' `[4, B, T]`) default to `mrope_positions` of the media present."""
        router_logits = [] if self.config.num_experts and labels is not None else None
        hidden = self.model(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                            mm_token_type_ids, position_ids, cu_seqlens, router_logits)
        return causal_lm_output(self.config, hidden, self.lm_head, labels, cu_seqlens, router_logits)

    # --- construction: the text model's rules -------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        Qwen35ForCausalLM.init_weights(self)
        self.model.visual.init_weights()  # its biases, layer norms and patch embedding too

    fp32_parameter_names = Qwen35ForCausalLM.fp32_parameter_names
    to_compute_dtype = Qwen35ForCausalLM.to_compute_dtype
    from_config = classmethod(Qwen35ForCausalLM.from_config.__func__)
    from_pretrained = classmethod(Qwen35ForCausalLM.from_pretrained.__func__)
    save_pretrained = Qwen35ForCausalLM.save_pretrained

    def generate(self, input_ids, **kwargs):
        """Prompts with images and videos (as transformers' processor returns them) -> new tokens: see
        `qwen35.generate.generate_with_media`."""
        from qwen35.generate import generate_with_media

        return generate_with_media(self, input_ids, **kwargs)

    @staticmethod
    def parameter_name(checkpoint_key: str) -> str | None:
        """Our parameter name for a checkpoint key (the identity), None for the tensors carried
        through untouched (multi-token prediction)."""
        return None if checkpoint_key.startswith("mtp.") else checkpoint_key

    @staticmethod
    def checkpoint_key(parameter_name: str) -> str:
        return parameter_name
