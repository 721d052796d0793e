"""A short real training run on the fast path: 50 AdamW steps on a repeating batch must learn it."""

import math

import pytest
import torch

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.parallel.checkpointing import apply_activation_checkpointing

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_fifty_steps_on_a_repeating_batch_drive_the_loss_down(fast_backend, checkpointing):
    config = Qwen35Config(
        vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = apply_activation_checkpointing(Qwen35ForCausalLM.from_config(config, device="cuda"), checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0, fused=True)
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
