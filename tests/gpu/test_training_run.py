"""A short real training run on the fast path: 50 AdamW steps on a repeating batch must learn it;
the AdamW applied inside the backward (`optim.in_backward`) against torch's fused AdamW; the
CPU-offloaded AdamW's pipeline (`optim.cpu_offload`) against the plain serial CPU update."""

import math

import pytest
import torch

from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.parallel.checkpointing import apply_activation_checkpointing
from qwen35.train.offload import OffloadedAdamW
from qwen35.train.optim import AdamWInBackward

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("checkpointing, optimizer_name", [
    ("none", "adamw"), ("selective", "adamw"), ("full", "in_backward"), ("full", "offloaded_in_backward")])
def test_fifty_steps_on_a_repeating_batch_drive_the_loss_down(fast_backend, checkpointing, optimizer_name):
    config = Qwen35Config(
        vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    offloaded = optimizer_name == "offloaded_in_backward"  # bf16 weights, float32 masters in CPU memory
    model = Qwen35ForCausalLM.from_config(config, device="cuda", dtype=torch.bfloat16 if offloaded else torch.float32)
    model = apply_activation_checkpointing(model, checkpointing)
    settings = dict(lr=2e-3, weight_decay=0.0)
    optimizer = {"adamw": lambda: torch.optim.AdamW(model.parameters(), **settings, fused=True),
                 "in_backward": lambda: AdamWInBackward(model.parameters(), **settings),
                 "offloaded_in_backward": lambda: OffloadedAdamW(model.parameters(), **settings, in_backward=True),
                 }[optimizer_name]()
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


class _LateBackward(torch.autograd.Function):
    """Identity whose backward first keeps the GPU busy: the host runs far ahead of the device,
    so an upload of new weights that did not wait for the backward's last read of the old ones
    would land before that read."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        torch.cuda._sleep(20_000_000)
        return grad


@pytest.mark.parametrize("in_backward", [False, True])
def test_offloaded_adamw_is_the_serial_cpu_update_bit_for_bit(in_backward):
    """bf16 weights on the GPU, their float32 masters on the CPU, every weight in 16 chunks through
    the pinned slots and both copy streams, the update after or inside the backward: five steps
    give the losses, weights and masters of the plain update (each gradient to the CPU, torch's
    fused AdamW on the whole master, the master rounded back), bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    width, depth = 1024, 6
    initial = [torch.randn(width, width, device="cuda", generator=gen).mul(width ** -0.5).bfloat16()
               for _ in range(depth)]
    x = torch.randn(2048, width, device="cuda", generator=gen, dtype=torch.bfloat16)
    settings = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = [torch.nn.Parameter(w.clone()) for w in initial]
    plain = [torch.nn.Parameter(w.clone()) for w in initial]
    optimizer = OffloadedAdamW(ours, **settings, in_backward=in_backward, chunk_numel=width * width // 16)
    masters = [w.float().cpu() for w in initial]
    moments = [(torch.zeros_like(m), torch.zeros_like(m)) for m in masters]

    def loss_of(weights):
        h = x
        for w in weights:
            h = _LateBackward.apply(torch.tanh(h @ w))
        return h.float().square().mean()

    for step in range(1, 6):
        loss = loss_of(ours)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expected = loss_of(plain)
        expected.backward()
        with torch.no_grad():
            for p, master, (exp_avg, exp_avg_sq) in zip(plain, masters, moments):
                torch._fused_adamw_([master], [p.grad.cpu().float()], [exp_avg], [exp_avg_sq], [],
                                    [torch.tensor(float(step))], lr=1e-3, beta1=0.9, beta2=0.95,
                                    weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
                p.copy_(master)
                p.grad = None
        assert torch.equal(loss, expected), step
    for p, q, master in zip(ours, plain, masters):
        assert torch.equal(p, q) and torch.equal(optimizer.state[p]["master"], master)
