"""Incremental decoding: greedy or sampled, for a batch of prompts of different lengths.

The prompts are prefilled together as one packed row (no padding ever enters a recurrent
state), then every step feeds one token per sequence through the per-layer cache.

The vision-language model decodes through the same loop (`generate_with_media`): its images and
videos enter with the prompts' forward, which also records in the cache where each sequence's M-RoPE
positions continue (`qwen35.model.vl.Qwen35VLModel.forward`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen35.model.cache import InferenceCache


def sample_next(logits_BV, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Greedy argmax, or a draw after temperature, top-k and top-p (nucleus) filtering."""
    if not do_sample:
        return logits_BV.argmax(-1)
    logits = logits_BV.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), -torch.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def sample_with_logprobs(logits_BV, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """`sample_next`'s token and its `log softmax(logits / temperature)` (temperature 1 when
    greedy), taken before top-k/top-p filtering: the log-prob the training forward computes for it.
    Without filtering the draw is from the exp of that same log-softmax, so one pass over the
    vocabulary serves both (at 256 sequences x 248k entries, sampling is a tenth of a decode step)."""
    logits = logits_BV.float()
    scale = temperature if do_sample and temperature > 0 else 1.0
    logp = torch.log_softmax(logits if scale == 1.0 else logits / scale, dim=-1)
    if do_sample and top_k == 0 and top_p >= 1.0:
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    else:
        token = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
    return token, logp.gather(-1, token[:, None])[:, 0]


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    media: dict | None = None,
):
    """Returns the new tokens of each prompt (up to and including the first eos); with
    `return_logprobs`, also each token's `log softmax(logits / temperature)` (temperature 1 when
    greedy), before top-k/top-p filtering: the log-prob a training forward computes for it.

    `media`: further inputs of the prompts' forward (the vision-language model's images, in the
    order of the prompts; `generate_with_media` builds them)."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    param = next(model.parameters())
    device, dtype = param.device, _embeddings(model).weight.dtype
    eos = eos.to(device)
    lengths = torch.tensor([len(p) for p in prompts])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device=device, dtype=torch.int32)
    cache = InferenceCache(model.config, len(prompts), int(lengths.max()) + max_new_tokens, device, dtype)

    packed = torch.tensor([t for p in prompts for t in p], device=device)[None]
    hidden = model.model(packed, cu_seqlens=cu_seqlens, cache=cache, **(media or {}))
    logits = model.lm_head(hidden[0, cu_seqlens[1:].long() - 1])
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new_tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        if do_sample or return_logprobs:
            token, logp = sample_with_logprobs(logits, do_sample, temperature, top_k, top_p, generator)
            logprobs.append(logp)
        else:  # greedy without log-probs: no pass over the vocabulary beyond the argmax
            token = logits.argmax(-1)
        new_tokens.append(torch.where(finished, -1, token))
        finished |= torch.isin(token, eos)
        if bool(finished.all()):
            break
        logits = model.lm_head(model.model(token[:, None], cache=cache)[:, -1])
    rows = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    tokens = [[t for t in row if t >= 0] for row in rows]
    if not return_logprobs:
        return tokens
    values = torch.stack(logprobs, dim=1).tolist() if logprobs else [[] for _ in prompts]
    return tokens, [row[: len(kept)] for row, kept in zip(values, tokens)]


def generate_with_media(
    model,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: Sequence[Sequence[int]] | torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    **options,
):
    """`Qwen35ForConditionalGeneration.generate`: `generate` for prompts with images and videos,
    given as transformers' processor returns them (`input_ids` padded, with `attention_mask`, or
    a list of token lists; `pixel_values` / `image_grid_thw` of all images and
    `pixel_values_videos` / `video_grid_thw` of all videos, each in order of appearance;
    `mm_token_type_ids` optional, derived from the pad tokens when absent). `options` are
    `generate`'s."""
    prompts = _unpadded(input_ids, attention_mask)
    param = next(model.parameters())
    media = {}
    for pixels, grid, names in ((pixel_values, image_grid_thw, ("pixel_values", "image_grid_thw")),
                                (pixel_values_videos, video_grid_thw, ("pixel_values_videos", "video_grid_thw"))):
        if pixels is None:
            continue
        if grid is None:
            raise ValueError(f"generate: {names[0]} need their {names[1]}")
        media[names[0]] = pixels.to(param.device, _embeddings(model).weight.dtype)
        media[names[1]] = grid.to(param.device)
    if media and mm_token_type_ids is not None:
        types = [t for row in _unpadded(mm_token_type_ids, attention_mask) for t in row]
        media["mm_token_type_ids"] = torch.tensor(types, device=param.device)[None]
    return generate(model, prompts, media=media, **options)


def _unpadded(rows, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """The tokens of each row that the mask keeps (left or right padding alike)."""
    rows = rows.tolist() if isinstance(rows, torch.Tensor) else rows
    if attention_mask is None:
        return [list(map(int, row)) for row in rows]
    return [[int(t) for t, keep in zip(row, mask) if keep] for row, mask in zip(rows, attention_mask.tolist())]


def _embeddings(model):
    """The token embedding table: the text model's, or the vision-language model's language model's."""
    return getattr(model.model, "language_model", model.model).embed_tokens
