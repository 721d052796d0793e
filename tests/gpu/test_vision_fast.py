"""The vision-language model on the fast path (varlen flash attention in the vision tower too)
against the reference path: a bf16 training step on a packed row of image documents."""

import pytest
import torch

from qwen35 import Qwen35ForConditionalGeneration
from qwen35.model import Qwen35VLConfig, VisionConfig

from test_model_fast import TINY, assert_fast_step_as_accurate_as_reference

pytestmark = pytest.mark.gpu

IMAGE, START, END = 997, 995, 996
GRIDS = ((1, 16, 16), (1, 8, 24), (1, 32, 8))  # 256x256, 128x384, 512x128 pixels


def _packed_image_documents(gen):
    docs, pixels = [], []
    for t, h, w in GRIDS:
        text = torch.randint(0, 990, (40,), device="cuda", generator=gen)
        pads = torch.full((t * h * w // 4,), IMAGE, device="cuda")
        docs.append(torch.cat([text[:20], torch.tensor([START], device="cuda"), pads,
                               torch.tensor([END], device="cuda"), text[20:]]))
        pixels.append(torch.randn(t * h * w, 3 * 2 * 16 * 16, device="cuda", generator=gen))
    cu = torch.tensor([0] + [len(d) for d in docs], device="cuda").cumsum(0).to(torch.int32)
    return dict(input_ids=torch.cat(docs)[None], pixel_values=torch.cat(pixels),
                image_grid_thw=torch.tensor(GRIDS, device="cuda"), cu_seqlens=cu)


def test_vl_training_step_fast_is_as_accurate_as_the_reference_path(fast_backend):
    vision = VisionConfig(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                          num_position_embeddings=64)
    config = Qwen35VLConfig(**TINY, vision=vision, image_token_id=IMAGE, vision_start_token_id=START,
                            vision_end_token_id=END)
    torch.manual_seed(0)
    model = Qwen35ForConditionalGeneration.from_config(config, device="cuda")
    batch = _packed_image_documents(torch.Generator(device="cuda").manual_seed(1))
    ids, cu = batch.pop("input_ids"), batch.pop("cu_seqlens")
    grads = assert_fast_step_as_accurate_as_reference("VL", model, ids, cu, **batch)
    assert any(n.startswith("model.visual.") for n in grads)
