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


@pytest.mark.parametrize("vocab,chunk", [(300, 7), (5000, 16)])  # 5000: two vocabulary blocks per row
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triton_softmax_step_equals_unfused(force_triton, monkeypatch, vocab, chunk, reduction):
    import seqshard.kernels.cross_entropy as ce

    calls = []
    triton_step = ce._softmax_step_triton
    monkeypatch.setattr(ce, "_softmax_step_triton", lambda *a: calls.append(1) or triton_step(*a))
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(23, 16, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (23,), generator=gen)
    labels[::5] = -100
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction=reduction)
    dh, dw = torch.autograd.grad(ref, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=chunk)
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    assert len(calls) == -(-23 // chunk)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for name, a, b in (("d hidden", gh, dh), ("d weight", gw, dw)):
        err = (a - b).abs().max() / b.abs().max()
        assert err <= 1e-5, f"{name}: rel err {err:.2e}"


def test_triton_without_grad_gives_the_loss_only(force_triton):
    hidden, weight = torch.randn(9, 8), torch.randn(40, 8)
    labels = torch.tensor([0, 3, -100, 39, 5, 5, 1, 2, 7])
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_bias_scale_and_softcap_equal_unfused(monkeypatch, kernels):
    """Heads with a bias (Phi), a logit scale (Cohere) or a final soft-cap (Gemma): value and grads."""
    if kernels == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("SEQSHARD_KERNELS", kernels)
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(37, 16, generator=gen, dtype=torch.float64).float()
    w = torch.randn(50, 16, generator=gen).float()
    b = torch.randn(50, generator=gen).float()
    labels = torch.randint(0, 50, (37,), generator=gen)
    labels[::5] = -100
    for bias, scale, cap in ((b, 1.0, 0.0), (None, 0.25, 0.0), (None, 1.0, 3.0), (b, 0.5, 2.0)):
        ins = [t.clone().requires_grad_() for t in (h, w)] + ([bias.clone().requires_grad_()] if bias is not None else [])
        refs = [t.detach().clone().requires_grad_() for t in ins]
        loss = linear_cross_entropy(ins[0], ins[1], labels, bias=ins[2] if bias is not None else None,
                                    logit_scale=scale, softcap=cap, chunk_size=8)
        z = (refs[0] @ refs[1].t() + (refs[2] if bias is not None else 0.0)) * scale
        z = torch.tanh(z / cap) * cap if cap else z
        ref = torch.nn.functional.cross_entropy(z, labels, ignore_index=-100, reduction="sum")
        loss.backward()
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(ins, refs):
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5)


def _weighted_case(vocab=300, n=41, seed=3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 16, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::6] = -100
    token_weights = torch.tensor([2.0, 0.5, 1.0, 0.25])[torch.randint(0, 4, (n,), generator=gen)]
    return hidden, weight, labels, token_weights


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_token_weights_scale_each_token_loss_and_gradient(kernel, reduction, request):
    request.getfixturevalue(f"force_{kernel}")
    hidden, weight, labels, w = _weighted_case(vocab=5000 if kernel == "triton" else 300)
    per_token = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="none")
    ref = (per_token * w).sum() / ((w * (labels != -100)).sum() if reduction == "mean" else 1)
    dh, dw = torch.autograd.grad(ref * 3, (hidden, weight))
    token_losses = torch.full((len(labels),), -1.0)
    got = linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=7, token_weights=w,
                               token_losses=token_losses)
    gh, gw = torch.autograd.grad(got * 3, (hidden, weight))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token_losses, per_token.detach(), rtol=1e-5, atol=1e-5)  # unweighted, 0 if ignored
    for name, a, b in (("d hidden", gh, dh), ("d weight", gw, dw)):
        err = (a - b).abs().max() / b.abs().max()
        assert err <= 1e-5, f"{name}: rel err {err:.2e}"


def test_unit_weights_are_bit_identical_to_no_weights():
    hidden, weight, labels, _ = _weighted_case()
    plain = linear_cross_entropy(hidden, weight, labels, chunk_size=7)
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    ones = linear_cross_entropy(hidden, weight, labels, chunk_size=7, token_weights=torch.ones(len(labels)))
    g_ones = torch.autograd.grad(ones, (hidden, weight))
    assert torch.equal(plain, ones) and all(torch.equal(a, b) for a, b in zip(g_plain, g_ones))
