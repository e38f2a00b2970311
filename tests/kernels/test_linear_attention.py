"""Chunked linear attention == the per-token recurrence, values and gradients."""
import pytest
import torch

from seqshard.kernels.linear_attention import chunk_linear_attention, linear_attention, naive_linear_attention

TOL = {"fp32": 1e-5}


def close(name, a, b, tol=TOL["fp32"]):
    err = (a - b).abs().max() / b.abs().max().clamp_min(1e-6)
    assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


def make(b=2, t=37, h=3, dk=8, dv=6, decay=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, t, h, dk, generator=gen), torch.randn(b, t, h, dk, generator=gen)
    v = torch.randn(b, t, h, dv, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, generator=gen)) / 4 if decay else None
    s0 = torch.randn(b, h, dk, dv, generator=gen)
    return q, k, v, g, s0


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_naive_forward_and_backward(decay, with_state):
    q, k, v, g, s0 = make(decay=decay)
    grads = []
    for fn in (naive_linear_attention, lambda *a: chunk_linear_attention(*a, chunk_size=8)):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        gg = g.clone().requires_grad_() if decay else None
        init = s0.clone().requires_grad_() if with_state else None
        o, s = fn(*ins, gg, None, init, True)
        (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward(retain_graph=True)
        (s.sum()).backward()
        grads.append((o.detach(), s.detach(), [t.grad for t in ins],
                      gg.grad if decay else None, init.grad if with_state else None))
    (o1, s1, g1, dg1, di1), (o2, s2, g2, dg2, di2) = grads
    close("o", o2, o1)
    close("final_state", s2, s1)
    for name, a, b in zip("qkv", g2, g1):
        close(f"d{name}", a, b)
    if decay:
        close("dg", dg2, dg1)
    if with_state:
        close("d initial_state", di2, di1)


def test_cu_seqlens_resets_state_per_document():
    q, k, v, g, _ = make(b=1, t=30)
    cu = torch.tensor([0, 1, 13, 30], dtype=torch.int32)
    o, states = linear_attention(q, k, v, g, cu_seqlens=cu, output_final_state=True)
    for i, (a, e) in enumerate([(0, 1), (1, 13), (13, 30)]):
        ref_o, ref_s = naive_linear_attention(q[:, a:e], k[:, a:e], v[:, a:e], g[:, a:e], output_final_state=True)
        close(f"doc {i} o", o[:, a:e], ref_o)
        close(f"doc {i} state", states[i:i + 1], ref_s)
    assert linear_attention(q, k, v, g, cu_seqlens=cu)[1] is None


def test_initial_state_per_document():
    q, k, v, g, _ = make(b=1, t=20)
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    init = torch.randn(2, 3, 8, 6)
    o, _ = linear_attention(q, k, v, g, initial_state=init, cu_seqlens=cu)
    ref, _ = naive_linear_attention(q[:, 9:], k[:, 9:], v[:, 9:], g[:, 9:], initial_state=init[1:])
    close("second document with its own initial state", o[:, 9:], ref)
