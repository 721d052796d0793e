import torch
import torch.nn.functional as F

from qwen35.ops.cross_entropy import linear_cross_entropy


def test_chunked_loss_equals_plain_cross_entropy_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=gen, requires_grad=True)
    weight = torch.randn(300, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 300, (50,), generator=gen)
    targets[::7] = -100
    ours = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    grads = torch.autograd.grad(ours, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")
    expected = torch.autograd.grad(plain, (hidden, weight))
    assert torch.allclose(ours, plain, rtol=1e-6)
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_no_target_at_all_gives_a_zero_loss_that_backward_still_reaches():
    """A micro-batch of prompt tokens only: every data-parallel rank must still run a backward."""
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((10,), -100))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))
