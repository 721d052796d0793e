"""Generation with images and videos: greedy output equals transformers' Qwen3_5ForConditionalGeneration
token for token, and the decoding steps continue the prompts' M-RoPE positions."""

import torch

from reference import VL_TOKENS, hf_vl_media_model
from qwen35 import Qwen35ForConditionalGeneration
from qwen35.model.cache import InferenceCache
from qwen35.model.vl import mm_token_types, mrope_positions

START, END, IMAGE = VL_TOKENS["vision_start_token_id"], VL_TOKENS["vision_end_token_id"], VL_TOKENS["image_token_id"]
VIDEO = VL_TOKENS["video_token_id"]
PATCH_VALUES = 3 * 2 * 16 * 16
NEW = 12


def _prompt(gen, *pieces):
    """Token ids, pixel rows and grids of a prompt of text runs (ints: their lengths) and
    images (tuples: their grids of patches)."""
    ids, grids = [], []
    for piece in pieces:
        if isinstance(piece, int):
            ids += torch.randint(2, 90, (piece,), generator=gen).tolist()
        else:
            ids += [START] + [IMAGE] * (piece[0] * piece[1] * piece[2] // 4) + [END]
            grids.append(piece)
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), PATCH_VALUES, generator=gen)
    return ids, pixels, grids


def _prompts(seed=0):
    """Images of different sizes (64x96 pixels; 128x32 and 32x32 in one prompt), and a text-only prompt."""
    gen = torch.Generator().manual_seed(seed)
    return [_prompt(gen, 3, (1, 4, 6), 4), _prompt(gen, 5), _prompt(gen, 2, (1, 8, 2), 1, (1, 2, 2), 2)]


def _media(prompts):
    grids = [g for _, _, gs in prompts for g in gs]
    return dict(pixel_values=torch.cat([p for _, p, _ in prompts]), image_grid_thw=torch.tensor(grids))


def _theirs(hf, ids, mask, media):
    """transformers' greedy tokens, never stopping early (eos None, pad 0)."""
    out = hf.generate(input_ids=ids, attention_mask=mask, **media, mm_token_type_ids=mm_token_types(ids, IMAGE, -1),
                      max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def _ours(hf, tmp_path):
    hf.save_pretrained(tmp_path / "hf")
    return Qwen35ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()


def test_greedy_generation_with_images_equals_transformers_token_for_token(tmp_path):
    hf = hf_vl_media_model()
    ours = _ours(hf, tmp_path)
    prompts = _prompts()
    media = _media(prompts)
    width = max(len(ids) for ids, _, _ in prompts)  # transformers: a left-padded batch with its mask
    ids = torch.tensor([[0] * (width - len(p)) + p for p, _, _ in prompts])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p, _, _ in prompts])[:, None]).long()
    theirs = _theirs(hf, ids, mask, media)
    # the processor's padded batch (with its mm_token_type_ids), and plain token lists, alike
    assert ours.generate(ids, attention_mask=mask, **media, mm_token_type_ids=mm_token_types(ids, IMAGE, -1),
                         max_new_tokens=NEW, eos_token_id=[]) == theirs
    assert ours.generate([p for p, _, _ in prompts], **media, max_new_tokens=NEW, eos_token_id=[]) == theirs
    for prompt in prompts:  # each alone
        alone = _media([prompt]) if prompt[2] else {}
        expected = _theirs(hf, torch.tensor([prompt[0]]), None, alone)
        assert ours.generate([prompt[0]], **alone, max_new_tokens=NEW, eos_token_id=[]) == expected
    assert len({tuple(t) for t in theirs}) == 3  # the prompts lead to different outputs
    # a sequence that reaches eos ends there, the others go on
    eos = theirs[2][3]
    stopped = ours.generate([p for p, _, _ in prompts], **media, max_new_tokens=NEW, eos_token_id=eos)
    assert stopped == [t[: t.index(eos) + 1] if eos in t else t for t in theirs]


def test_decoding_after_an_image_continues_from_its_largest_position_plus_one(tmp_path):
    """Each step's logits equal one full forward over the prompt and the tokens so far, whose
    M-RoPE positions put the text after an image at its largest position + 1."""
    ours = _ours(hf_vl_media_model(), tmp_path)
    ids, pixels, grids = _prompt(torch.Generator().manual_seed(2), 3, (1, 4, 6), 2)
    tokens = [7, 8, 9, 10]
    grid = torch.tensor(grids)
    full_ids = torch.tensor([ids + tokens])
    positions = mrope_positions(mm_token_types(full_ids, IMAGE, -1), grid)
    # 3 text tokens and the vision start (positions 0-3), an image of 2x3 merged tokens (4-6 on
    # the width axis), the vision end and 2 text tokens (7-9): the new tokens go on at 10
    assert positions[:, 0, len(ids):].tolist() == [[10, 11, 12, 13]] * 3
    with torch.no_grad():
        full = ours(input_ids=full_ids, pixel_values=pixels, image_grid_thw=grid).logits[0, len(ids) - 1:]
        cache = InferenceCache(ours.config, 1, len(ids) + len(tokens), "cpu", torch.float32)
        hidden = [ours.model(torch.tensor([ids]), pixels, grid, cache=cache)[0, -1]]
        assert cache.position_offsets.tolist() == [10 - len(ids)]
        hidden += [ours.model(torch.tensor([[t]]), cache=cache)[0, -1] for t in tokens]
    torch.testing.assert_close(ours.lm_head(torch.stack(hidden)), full, rtol=1e-5, atol=1e-5)


def _video(gen, grid):
    """A video's tokens as the processor writes them (per frame pair a timestamp, here 3 random
    text tokens, then its own vision run of pads) and its pixel rows."""
    t, h, w = grid
    ids = []
    for _ in range(t):
        ids += torch.randint(2, 90, (3,), generator=gen).tolist() + [START] + [VIDEO] * (h * w // 4) + [END]
    return ids, torch.randn(t * h * w, PATCH_VALUES, generator=gen)


def test_greedy_generation_with_videos_equals_transformers_token_for_token(tmp_path):
    hf = hf_vl_media_model()
    ours = _ours(hf, tmp_path)
    gen = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(2, 90, (n,), generator=gen).tolist()  # noqa: E731
    video_a, pixels_a = _video(gen, (2, 4, 4))
    image_ids, image_pixels, image_grids = _prompt(gen, 2, (1, 4, 6))
    video_b, pixels_b = _video(gen, (3, 2, 4))
    # a video alone; an image then a video in one prompt; text only
    prompts = [text(3) + video_a + text(4), image_ids + text(1) + video_b + text(2), text(5)]
    media = dict(pixel_values=image_pixels, image_grid_thw=torch.tensor(image_grids),
                 pixel_values_videos=torch.cat([pixels_a, pixels_b]), video_grid_thw=torch.tensor([[2, 4, 4], [3, 2, 4]]))
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    types = mm_token_types(ids, IMAGE, VIDEO)
    theirs = hf.generate(input_ids=ids, attention_mask=mask, **media, mm_token_type_ids=types, max_new_tokens=NEW,
                         do_sample=False, eos_token_id=None, pad_token_id=0)[:, width:].tolist()
    assert ours.generate(ids, attention_mask=mask, **media, mm_token_type_ids=types, max_new_tokens=NEW,
                         eos_token_id=[]) == theirs
    assert ours.generate(prompts, **media, max_new_tokens=NEW, eos_token_id=[]) == theirs
    alone = dict(pixel_values_videos=pixels_a, video_grid_thw=torch.tensor([[2, 4, 4]]))
    expected = hf.generate(input_ids=torch.tensor([prompts[0]]), **alone, max_new_tokens=NEW, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, len(prompts[0]):].tolist()
    assert ours.generate([prompts[0]], **alone, max_new_tokens=NEW, eos_token_id=[]) == expected == theirs[:1]
    assert len({tuple(t) for t in theirs}) == 3  # the prompts lead to different outputs
