"""A short real training run on the fast path: 50 AdamW steps on a repeating batch must learn it;
and the AdamW applied inside the backward (`optim.in_backward`) against torch's fused AdamW."""

import math

import pytest
import torch

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.parallel.checkpointing import apply_activation_checkpointing
from qwen35.train.optim import AdamWInBackward

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("checkpointing, in_backward", [("none", False), ("selective", False), ("full", True)])
def test_fifty_steps_on_a_repeating_batch_drive_the_loss_down(fast_backend, checkpointing, in_backward):
    config = Qwen35Config(
        vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = apply_activation_checkpointing(Qwen35ForCausalLM.from_config(config, device="cuda"), checkpointing)
    settings = dict(lr=2e-3, weight_decay=0.0)
    optimizer = (AdamWInBackward(model.parameters(), **settings) if in_backward
                 else torch.optim.AdamW(model.parameters(), **settings, fused=True))
    docs = (190, 411, 77, 345)
    ids = torch.randint(0, config.vocab_size, (1, sum(docs)), device="cuda")
    cu = torch.tensor([0, *docs], device="cuda").cumsum(0).to(torch.int32)
    losses = []
    for _ in range(50):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, cu_seqlens=cu, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print("losses", [round(x, 3) for x in losses[::5]], round(losses[-1], 3))
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] > math.log(config.vocab_size) - 0.5  # started from chance
    assert losses[-1] < 0.1 * losses[0]
    assert model.model.layers[0].linear_attn.A_log.dtype == torch.float32


def test_adamw_in_backward_is_torchs_fused_adamw_bit_for_bit():
    """The same gradients (w * g summed has the gradient g) through both, five steps."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(4096, 1024), (1024,), (3, 257, 129)]
    weights = [torch.randn(s, device="cuda", generator=gen) * 0.02 for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    groups = lambda params: [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
    settings = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    in_backward = AdamWInBackward(groups(ours), **settings)
    fused = torch.optim.AdamW(groups(theirs), **settings, fused=True)
    for _ in range(5):
        grads = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
        sum((p * g).sum() for p, g in zip(ours, grads)).backward()
        for p, g in zip(theirs, grads):
            p.grad = g
        fused.step()
        torch.testing.assert_close(in_backward.take_grad_norm(), torch.stack([g.norm() for g in grads]).norm())
    for a, b in zip(ours, theirs):
        assert a.grad is None and torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(in_backward.state[a][key], fused.state[b][key])
