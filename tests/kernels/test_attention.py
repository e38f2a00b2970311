"""Varlen attention: the torch reference against a dense masked softmax, and the Triton kernels
(under TRITON_INTERPRET=1) against the reference, forward, lse and dq/dk/dv."""
import pytest
import torch

from seqshard.kernels.attention import attention, attention_backward, attention_forward, attention_reference

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def close(name, a, b, dtype):
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), f"{name}: -inf pattern differs"
    err = (a[fin].float() - b[fin].float()).abs().max() / b[fin].float().abs().max().clamp_min(1e-6)
    assert err <= TOL[dtype], f"{name} ({dtype}): rel err {err:.2e}"


def make(lq, lk, heads, kv_heads, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), heads, dim, generator=gen).to(dtype)
    k = torch.randn(sum(lk), kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(sum(lk), kv_heads, dim, generator=gen).to(dtype)
    dout = torch.randn(sum(lq), heads, dim, generator=gen).to(dtype)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, dout, cu(lq), cu(lk)


def test_reference_matches_dense_masked_softmax():
    q, k, v, _, cu, _ = make([5, 9], [5, 9], 4, 2, 8, torch.float64)
    out, lse = attention_reference(q, k, v, cu, cu, causal=True, return_lse=True)
    for a, b in ((0, 5), (5, 14)):
        kk, vv = k[a:b].repeat_interleave(2, 1), v[a:b].repeat_interleave(2, 1)
        s = torch.einsum("qhd,khd->hqk", q[a:b], kk) / 8 ** 0.5
        s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(out[a:b], torch.einsum("hqk,khd->qhd", s.softmax(-1), vv), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[:, a:b], s.logsumexp(-1).float())


CASES = [  # (q lengths, k lengths, heads, kv heads, head dim, causal)
    ([1, 17, 5], [1, 17, 5], 4, 4, 64, True),  # length-1 document, non-power-of-two lengths
    ([33], [33], 4, 2, 64, False),  # single document, GQA 2
    ([7, 20], [7, 20], 4, 1, 64, True),  # GQA 4
    ([6, 9], [19, 9], 2, 2, 64, True),  # Lq < Lk: bottom-right causal alignment, as ring blocks use
    ([9, 3], [4, 3], 2, 1, 64, True),  # Lq > Lk: the first rows see no key (out 0, lse -inf)
    ([10], [10], 2, 2, 128, True),  # head dim 128
]


# every case in fp32; bf16 on the head-dim-64 cases only (the interpreter is slow); fp16 on two
DTYPE_CASES = [(torch.float32, i) for i in range(len(CASES))] + \
    [(torch.bfloat16, i) for i, c in enumerate(CASES) if c[4] == 64] + [(torch.float16, 0), (torch.float16, 2)]


@pytest.mark.parametrize("dtype,case_id", DTYPE_CASES, ids=[f"{str(d)[6:]}-case{i}" for d, i in DTYPE_CASES])
def test_triton_matches_reference(force_triton, dtype, case_id):
    lq, lk, heads, kv_heads, dim, causal = CASES[case_id]
    q, k, v, dout, cu_q, cu_k = make(lq, lk, heads, kv_heads, dim, dtype)
    ref_out, ref_lse = attention_reference(q, k, v, cu_q, cu_k, causal=causal, return_lse=True)
    out, lse = attention_forward(q, k, v, cu_q, cu_k, None, None, causal)
    close("out", out, ref_out, dtype)
    close("lse", lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype)
    ins = [t.float().clone().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ins, cu_q, cu_k, causal=causal)
    ref.backward(dout.float())
    grads = attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, None, None, causal)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ins):
        close(name, got, want.grad, dtype)


def test_autograd_entry_point_uses_triton(force_triton):
    q, k, v, dout, cu, _ = make([12, 4], [12, 4], 2, 1, 64, torch.float32)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*ins, cu, cu, 12, 12, causal=True)
    out.backward(dout)
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    attention_reference(*refs, cu, cu, causal=True).backward(dout)
    for name, a, b in zip("qkv", ins, refs):
        close(f"d{name}", a.grad, b.grad, torch.float32)
