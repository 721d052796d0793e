"""The vision-language model against transformers' Qwen3_5(Moe)ForConditionalGeneration."""

import pytest
import torch

from reference import VL_TOKENS, hf_vl_media_model
from qwen35 import Qwen35ForConditionalGeneration
from qwen35.model.vl import mm_token_types, mrope_positions

START, END, IMAGE, VIDEO = (VL_TOKENS[k] for k in ("vision_start_token_id", "vision_end_token_id",
                                                   "image_token_id", "video_token_id"))
PATCH_VALUES = 3 * 2 * 16 * 16  # channels x temporal patch x patch²: one row of pixel_values


def _text(n, gen):
    return torch.randint(2, 90, (n,), generator=gen).tolist()


def _image(grid):
    t, h, w = grid
    return [START] + [IMAGE] * (t * h * w // 4) + [END]


def _video(grid, gen):
    """As the processor writes a video: per frame a timestamp (text), then the frame's pads."""
    t, h, w = grid
    return sum((_text(2, gen) + [START] + [VIDEO] * (h * w // 4) + [END] for _ in range(t)), [])


def _pixels(grids, gen):
    return torch.randn(sum(t * h * w for t, h, w in grids), PATCH_VALUES, generator=gen)


def _batch(seed=0):
    """Two rows of 26 tokens: two images of different sizes (64x96 and 128x32 pixels), and a
    video of 4 frames of 64x64 (2 temporal patches)."""
    gen = torch.Generator().manual_seed(seed)
    images, videos = [(1, 4, 6), (1, 8, 2)], [(2, 4, 4)]
    row0 = _text(5, gen) + _image(images[0]) + _text(4, gen) + _image(images[1]) + _text(3, gen)
    row1 = _text(6, gen) + _video(videos[0], gen) + _text(4, gen)
    ids = torch.tensor([row0, row1])
    return dict(input_ids=ids, pixel_values=_pixels(images, gen), image_grid_thw=torch.tensor(images),
                pixel_values_videos=_pixels(videos, gen), video_grid_thw=torch.tensor(videos),
                mm_token_type_ids=mm_token_types(ids, IMAGE, VIDEO))


def _ours(hf, tmp_path):
    hf.save_pretrained(tmp_path / "hf")
    return Qwen35ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def test_mrope_positions_equal_transformers_get_rope_index():
    hf = hf_vl_media_model()
    batch = _batch()
    theirs, _ = hf.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                        batch["image_grid_thw"], batch["video_grid_thw"])
    ours = mrope_positions(batch["mm_token_type_ids"], batch["image_grid_thw"], batch["video_grid_thw"])
    assert torch.equal(ours, theirs)
    # the layout itself: row 0's first image (merged grid 2x3) starts after 5 text tokens and
    # the vision start, at 6; the text after it resumes at 6 + max(2, 3)
    assert ours[:, 0, 6:12].tolist() == [[6] * 6, [6, 6, 6, 7, 7, 7], [6, 7, 8, 6, 7, 8]]
    assert ours[:, 0, 12].tolist() == [9, 9, 9]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_logits_and_every_gradient_equal_transformers(tmp_path, moe):
    hf = hf_vl_media_model(moe=moe)
    ours = _ours(hf, tmp_path)
    batch = _batch()
    ours_logits = ours(**batch).logits
    hf_logits = hf(**batch).logits
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-5
    weights = torch.randn(hf_logits.shape, generator=torch.Generator().manual_seed(1))
    (ours_logits * weights).sum().backward()
    (hf_logits * weights).sum().backward()
    hf_params = dict(hf.named_parameters())  # both keep MoE experts fused (3-D) in memory
    assert hf_params.keys() == dict(ours.named_parameters()).keys()
    for name, param in ours.named_parameters():
        assert param.grad is not None and _relative(param.grad, hf_params[name].grad) <= 1e-4, name


def test_loss_with_labels_equals_transformers(tmp_path):
    hf = hf_vl_media_model()
    ours = _ours(hf, tmp_path)
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["mm_token_type_ids"] > 0, -100)
    with torch.no_grad():
        assert abs(ours(**batch, labels=labels).loss.item() - hf(**batch, labels=labels).loss.item()) <= 1e-5


def _documents(seed=3):
    """Three image-text documents with images of different sizes."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for grid, before, after in (((1, 4, 4), 3, 5), ((1, 2, 6), 6, 2), ((1, 6, 2), 1, 9)):
        ids = torch.tensor([_text(before, gen) + _image(grid) + _text(after, gen)])
        docs.append(dict(input_ids=ids, pixel_values=_pixels([grid], gen), image_grid_thw=torch.tensor([grid])))
    return docs


def test_packed_row_of_image_documents_equals_documents_one_by_one(tmp_path):
    hf = hf_vl_media_model()
    ours = _ours(hf, tmp_path)
    docs = _documents()
    lengths = torch.tensor([0] + [d["input_ids"].shape[1] for d in docs])
    packed = dict(input_ids=torch.cat([d["input_ids"] for d in docs], dim=1),
                  pixel_values=torch.cat([d["pixel_values"] for d in docs]),
                  image_grid_thw=torch.cat([d["image_grid_thw"] for d in docs]),
                  cu_seqlens=lengths.cumsum(0).to(torch.int32))
    weights = torch.randn(1, int(lengths.sum()), hf.config.text_config.vocab_size,
                          generator=torch.Generator().manual_seed(1))
    logits = ours(**packed).logits
    (logits * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    alone = []
    for d, w in zip(docs, weights.split(lengths[1:].tolist(), dim=1)):
        alone.append(ours(**d).logits)
        (alone[-1] * w).sum().backward()
    with torch.no_grad():
        hf_alone = [hf(**d, mm_token_type_ids=mm_token_types(d["input_ids"], IMAGE, VIDEO)).logits for d in docs]
    assert (logits - torch.cat(alone, dim=1)).abs().max().item() <= 1e-5
    assert (logits - torch.cat(hf_alone, dim=1)).abs().max().item() <= 1e-5
    for name, param in ours.named_parameters():
        assert _relative(packed_grads[name], param.grad) <= 1e-4, name


def test_processor_writes_patches_in_the_merge_order_the_tower_assumes():
    """transformers' image processor (its PIL backend, offline): rows of pixel_values come in
    2x2 merge-block order, each row is (channel, frame, pixel row, pixel column), and an image is
    repeated to the 2 frames of a temporal patch."""
    import numpy as np
    from transformers import Qwen2VLImageProcessorPil

    from qwen35.model.vision import merge_order

    processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rows, cols = np.meshgrid(np.arange(64), np.arange(96), indexing="ij")
    image = np.stack([rows * 2, cols * 2, np.full_like(rows, 7)], axis=-1).astype(np.uint8)
    out = processor(images=[image], return_tensors="pt", do_resize=False)
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    pixels = ((out["pixel_values"].view(-1, 3, 2, 16, 16) * 0.5 + 0.5) * 255).round()  # undo the normalisation
    patch_rows, patch_cols = merge_order(4, 6, 2)
    assert torch.equal(pixels[:, 0, 0, 0, 0] / 2, patch_rows * 16.0)
    assert torch.equal(pixels[:, 1, 0, 0, 0] / 2, patch_cols * 16.0)
    assert torch.equal(pixels[0, 0, 0, :, 0] / 2, torch.arange(16.0))  # pixel rows along dim 3
    assert torch.equal(pixels[:, :, 0], pixels[:, :, 1])


def test_pad_tokens_that_do_not_match_the_grids_are_a_clear_error():
    from qwen35.model import Qwen35VLConfig

    model = Qwen35ForConditionalGeneration.from_config(Qwen35VLConfig.from_hf_dict(hf_vl_media_model().config.to_dict()))
    batch = _batch()
    batch["image_grid_thw"] = torch.tensor([[1, 4, 6], [1, 4, 6]])  # the ids hold 4 pads for the second
    batch["pixel_values"] = torch.randn(48, PATCH_VALUES)
    with pytest.raises(ValueError, match="image pad tokens"):
        model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"})
    with pytest.raises(ValueError, match="grid"):
        mrope_positions(batch["mm_token_type_ids"], torch.tensor([[1, 4, 6], [1, 2, 6]]), batch["video_grid_thw"])
