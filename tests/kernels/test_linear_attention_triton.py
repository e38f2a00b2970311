"""Triton chunked linear attention (under TRITON_INTERPRET=1) == the torch references: output,
final state and the gradients of q, k, v, g and initial_state, batched and varlen."""
import pytest
import torch

pytest.importorskip("triton")

from seqshard.kernels.linear_attention import linear_attention, naive_linear_attention  # noqa: E402
from seqshard.kernels.linear_attention import triton_chunk  # noqa: E402
from seqshard.kernels.linear_attention.triton_chunk import triton_linear_attention  # noqa: E402

TOL = {"fp32": 1e-5, "bf16": 2e-2}
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "d initial_state")


def close(name, a, b, tol):
    err = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)
    assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


def make(b, t, h, dk, dv, n_states, decay, seed=0):
    """q, k ``[b, t, h, dk]``, v ``[b, t, h, dv]``, g ``[b, t, h]`` (or None), states ``[n, h, dk, dv]``."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, t, h, dk, generator=gen), torch.randn(b, t, h, dk, generator=gen)
    v = torch.randn(b, t, h, dv, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, generator=gen)) / 4 if decay else None
    return q, k, v, g, torch.randn(n_states, h, dk, dv, generator=gen)


def run(fn, q, k, v, g, s0, final, cu, dtype=torch.float32):
    """Forward + backward of a weighted sum of o (and of the final state) -> values and grads."""
    ins = [None if x is None else x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v, g)]
    init = None if s0 is None else s0.clone().requires_grad_()
    o, state = fn(*ins, None, init, final, cu)
    loss = (o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
    if final:
        loss = loss + (state * torch.linspace(1, -2, state.numel()).view_as(state)).sum()
    else:
        assert state is None
    loss.backward()
    grads = [None if x is None else x.grad for x in ins] + [None if init is None else init.grad]
    return [o.detach(), None if state is None else state.detach()] + grads


def reference(q, k, v, g, scale, s0, final, cu):
    return linear_attention(q, k, v, g, scale, s0, final, cu, impl=naive_linear_attention)


def check(q, k, v, g, s0, final, cu, dtype=torch.float32, tol=TOL["fp32"]):
    got = run(triton_linear_attention, q, k, v, g, s0, final, cu, dtype)
    # the reference sees the same (rounded) inputs, in fp32
    want = run(reference, *[None if x is None else x.to(dtype).float() for x in (q, k, v, g)], s0, final, cu)
    for name, a, b in zip(NAMES, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, f"{name}: {tuple(a.shape)} != {tuple(b.shape)}"
            close(name, a, b, tol)


CU = torch.tensor([0, 1, 1, 17, 40], dtype=torch.int32)  # lengths 1, 0, 16 (one chunk), 23 (1.4 chunks)
BATCH_CASES = [  # (K, V, decay, initial_state, output_final_state)
    (16, 16, False, False, False),
    (12, 20, True, True, True),
    (16, 16, True, False, True),
    (12, 20, False, True, False),
]


@pytest.mark.parametrize("dk,dv,decay,init,final", BATCH_CASES)
def test_batched_matches_naive(dk, dv, decay, init, final):
    q, k, v, g, s0 = make(2, 37, 2, dk, dv, 2, decay)
    check(q, k, v, g, s0 if init else None, final, None)


@pytest.mark.parametrize("dk,dv,decay,init,final", [(12, 20, True, True, True), (16, 16, False, False, False)])
def test_varlen_matches_naive_per_document(dk, dv, decay, init, final):
    q, k, v, g, s0 = make(1, 40, 2, dk, dv, 4, decay, seed=1)
    check(q, k, v, g, s0 if init else None, final, CU)


def test_several_value_blocks_and_chunk_32(monkeypatch):
    monkeypatch.setattr(triton_chunk, "MAX_BV", 16)  # V = 20 -> two value blocks, dq/dk partials summed
    monkeypatch.setattr(triton_chunk, "CHUNK", 32)
    q, k, v, g, s0 = make(1, 40, 2, 12, 20, 4, True, seed=2)
    check(q, k, v, g, s0, True, CU)


def test_bf16_varlen():
    q, k, v, g, s0 = make(1, 40, 2, 16, 16, 4, True, seed=3)
    check(q, k, v, g, s0, True, CU, dtype=torch.bfloat16, tol=TOL["bf16"])


@pytest.mark.parametrize("decay", [-10.0, -30.0])
def test_decay_gradient_over_value_blocks_under_strong_decay(decay, monkeypatch):
    """dg summed from two value blocks' partials (every term of it is linear in v / do) matches
    the fp64 recurrence relative to its own, tiny, size; varlen with an initial state."""
    monkeypatch.setattr(triton_chunk, "MAX_BV", 16)  # V = 20 -> two value blocks
    q, k, v, _, s0 = make(1, 40, 2, 12, 20, 4, False, seed=4)
    g = torch.full((1, 40, 2), decay)
    got = run(triton_linear_attention, q, k, v, g, s0, True, CU)
    want = run(reference, *[x.double() for x in (q, k, v, g)], s0.double(), True, CU)
    err = ((got[5].double() - want[5]).abs().max() / want[5].abs().max()).item()
    assert err <= TOL["fp32"], f"dg: rel err {err:.2e}"


def test_dispatch(force_triton, monkeypatch):
    calls = []
    monkeypatch.setattr(triton_chunk, "triton_linear_attention",
                        lambda *a: calls.append(1) or triton_linear_attention(*a))
    q, k, v, g, s0 = make(1, 20, 2, 16, 16, 2, True, seed=5)
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    o, s = linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    ref_o, ref_s = reference(q, k, v, g, None, s0, True, cu)
    assert calls == [1]
    close("o", o, ref_o, TOL["fp32"])
    close("final_state", s, ref_s, TOL["fp32"])
    linear_attention(q, k, v, g, cu_seqlens=cu, impl=naive_linear_attention)  # explicit impl: reference
    assert calls == [1]
