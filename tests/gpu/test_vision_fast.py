"""The vision-language model on the fast path (varlen flash attention in the vision tower too)
against the reference path: a bf16 training step on a packed row of image documents."""

import pytest
import torch

from qwen35 import Qwen35ForConditionalGeneration
from qwen35.model import Qwen35VLConfig, VisionConfig

from test_model_fast import TINY, flat, rel_err

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


def _step(model, backend, batch, autocast=True):
    from qwen35 import ops

    ops.use_backend(backend)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
    finally:
        ops.use_backend("reference")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def test_vl_training_step_fast_is_as_accurate_as_the_reference_path(fast_backend):
    vision = VisionConfig(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                          num_position_embeddings=64)
    config = Qwen35VLConfig(**TINY, vision=vision, image_token_id=IMAGE, vision_start_token_id=START,
                            vision_end_token_id=END)
    torch.manual_seed(0)
    model = Qwen35ForConditionalGeneration.from_config(config, device="cuda")
    batch = _packed_image_documents(torch.Generator(device="cuda").manual_seed(1))
    loss_true, grads_true = _step(model, "reference", batch, autocast=False)
    loss_ref, grads_ref = _step(model, "reference", batch)
    loss_fast, grads_fast = _step(model, "fast", batch)
    assert any(n.startswith("model.visual.") for n in grads_fast)
    err_ref = {n: rel_err(grads_ref[n], grads_true[n]) for n in grads_true}
    err_fast = {n: rel_err(grads_fast[n], grads_true[n]) for n in grads_true}
    flat_ref, flat_fast = rel_err(flat(grads_ref), flat(grads_true)), rel_err(flat(grads_fast), flat(grads_true))
    worst = sorted(((n, err_fast[n], err_ref[n]) for n in err_fast), key=lambda t: -t[1] / (t[2] + 1e-3))[:5]
    print(f"VL: loss fp32 {loss_true.item():.5f} ref-bf16 {loss_ref.item():.5f} fast {loss_fast.item():.5f}; "
          f"all-grads rel err vs fp32: reference-bf16 {flat_ref:.2e}, fast {flat_fast:.2e}; worst {worst}")
    assert rel_err(loss_fast, loss_true) <= 1e-3
    assert flat_fast <= 1.25 * flat_ref + 2e-3
    assert all(err_fast[n] <= 2 * err_ref[n] + 1e-2 for n in err_fast), worst
