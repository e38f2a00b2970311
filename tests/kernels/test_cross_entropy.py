import pytest
import torch
import torch.nn.functional as F

from seqshard.kernels import linear_cross_entropy


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_equals_unfused_cross_entropy_value_and_grads(reduction, chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=gen, requires_grad=True)
    weight = torch.randn(300, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 300, (50,), generator=gen)
    labels[::7] = -100
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction=reduction)
    dh, dw = torch.autograd.grad(ref * 3, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=chunk)
    gh, gw = torch.autograd.grad(got * 3, (hidden, weight))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for name, a, b in (("d hidden", gh, dh), ("d weight", gw, dw)):  # fp32: 1e-5 of the largest entry
        err = (a - b).abs().max() / b.abs().max()
        assert err <= 1e-5, f"{name}: rel err {err:.2e}"


def test_all_ignored_gives_zero_loss_and_grads():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((4,), -100), reduction="mean")
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
