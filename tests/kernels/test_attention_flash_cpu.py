"""The memory-efficient attention paths against the dense reference: out, lse, dq/dk/dv, through
``attention`` (autograd) and through the ring's block pair ``attention_forward`` /
``attention_backward``. ``auto`` on CPU tensors is PyTorch's flash kernel per document
(``flash_cpu.py``); ``blockwise`` is the plain-torch fallback for other devices (``blockwise.py``)."""
import pytest
import torch

from seqshard.kernels.attention import attention, attention_backward, attention_forward, attention_reference
from seqshard.kernels.attention import blockwise
from seqshard.kernels.attention.flash_cpu import _pieces

from .test_attention import close, make

CASES = {  # name: (q lengths, k lengths, heads, kv heads, head dim)
    "equal": ([1, 17, 5], [1, 17, 5], 4, 4, 32),
    "gqa2": ([33, 8], [33, 8], 4, 2, 32),
    "gqa4": ([7, 20], [7, 20], 8, 2, 64),
    "q_shorter": ([6, 9, 3], [19, 9, 40], 2, 2, 32),  # bottom-right: a full piece + a causal piece
    "q_longer": ([9, 3, 5], [4, 3, 1], 2, 1, 32),  # the first rows see no key: out 0, lse -inf
    "zero_length_docs": ([0, 5, 0, 4, 3, 0], [4, 5, 0, 0, 6, 0], 4, 2, 32),
    "one_long_doc": ([700], [700], 2, 1, 32),  # spans several of the CPU kernel's q (64) and kv (512) tiles
    "many_tiny_docs": ([1, 2, 3, 1, 4, 2, 1, 1, 5, 3] * 4, [1, 2, 3, 1, 4, 2, 1, 1, 5, 3] * 4, 2, 2, 16),
}
IMPLS = ["auto", "blockwise"]
PARAMS = [(impl, name, causal, dtype) for impl in IMPLS for name in CASES for causal in (True, False)
          for dtype in (torch.float32, torch.bfloat16)]
IDS = [f"{impl}-{name}-{'causal' if causal else 'full'}-{str(dtype)[6:]}" for impl, name, causal, dtype in PARAMS]


@pytest.fixture
def kernels(monkeypatch):
    """Select the attention path through ``SEQSHARD_KERNELS`` (read at each call). The blockwise
    path gets a tiny score budget, so every document longer than 16 rows is cut into row blocks."""
    monkeypatch.setattr(blockwise, "SCORE_BUDGET_BYTES", 16 << 10)
    return lambda mode: monkeypatch.setenv("SEQSHARD_KERNELS", mode)


def reference_grads(q, k, v, dout, cu_q, cu_k, causal):
    """fp32 dense reference: (out, lse, dq, dk, dv)."""
    ins = [t.float().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*ins, cu_q, cu_k, causal=causal, return_lse=True)
    if out.requires_grad:
        out.backward(dout.float())
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in ins]
    return (out.detach(), lse, *grads)


@pytest.mark.parametrize("impl,name,causal,dtype", PARAMS, ids=IDS)
def test_matches_reference(kernels, impl, name, causal, dtype):
    lq, lk, heads, kv_heads, dim = CASES[name]
    q, k, v, dout, cu_q, cu_k = make(lq, lk, heads, kv_heads, dim, dtype)
    ref_out, ref_lse, *ref_grads = reference_grads(q, k, v, dout, cu_q, cu_k, causal)
    kernels(impl)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*ins, cu_q, cu_k, max(lq), max(lk), causal=causal, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (heads, sum(lq))
    close("out", out.detach(), ref_out, dtype)
    close("lse", lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype)
    out.backward(dout)
    for n, got, want in zip(("dq", "dk", "dv"), ins, ref_grads):
        assert got.grad.dtype == dtype and got.grad.shape == got.shape
        close(n, got.grad, want, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["equal", "gqa2", "q_shorter", "q_longer", "zero_length_docs"])
def test_block_pair_matches_reference(kernels, impl, name):
    """The ring's no-autograd pair, with the backward fed a *final* out/lse that also covers another
    key block (as after a ring merge): the gradients of this block are those of the joint softmax."""
    lq, lk, heads, kv_heads, dim = CASES[name]
    q, k, v, dout, cu_q, cu_k = make(lq, lk, heads, kv_heads, dim, torch.float32)
    _, k2, v2, _, _, _ = make(lq, lk, heads, kv_heads, dim, torch.float32, seed=1)
    kernels(impl)
    out, lse = attention_forward(q, k, v, cu_q, cu_k, max(lq), max(lk), True)
    ref_out, ref_lse = attention_reference(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    close("out", out, ref_out, torch.float32)
    close("lse", lse, ref_lse, torch.float32)
    # a second, non-causal block of keys for the same queries, merged in fp32 as ring.py does
    out2, lse2 = attention_forward(q, k2, v2, cu_q, cu_k, max(lq), max(lk), False)
    final_lse = torch.logaddexp(lse, lse2)
    w1 = torch.exp(lse - final_lse).nan_to_num(0.0).t().unsqueeze(-1)
    w2 = torch.exp(lse2 - final_lse).nan_to_num(0.0).t().unsqueeze(-1)
    final_out = out.float() * w1 + out2.float() * w2
    got = attention_backward(dout, q, k, v, final_out, final_lse, cu_q, cu_k, max(lq), max(lk), True)
    kernels("reference")
    want = attention_backward(dout, q, k, v, final_out, final_lse, cu_q, cu_k, max(lq), max(lk), True)
    for n, a, b in zip(("dq", "dk", "dv"), got, want):
        close(n, a, b, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_no_tokens_at_all(kernels, impl, causal):
    """T = 0 (a rank whose shard holds nothing): empty out and lse, zero-size gradients, no crash
    (the CPU kernel itself dies with SIGFPE on a zero-length sequence, so it must never see one)."""
    q, k, v = (torch.zeros(0, 4, 32, requires_grad=True) for _ in range(3))
    cu = torch.zeros(3, dtype=torch.int32)
    kernels(impl)
    out, lse = attention(q, k, v, cu, cu, 0, 0, causal=causal, return_lse=True)
    assert out.shape == (0, 4, 32) and lse.shape == (4, 0) and lse.dtype == torch.float32
    out.sum().backward()
    assert all(t.grad is not None and t.grad.shape == (0, 4, 32) for t in (q, k, v))


def test_pieces_cover_the_bottom_right_mask():
    """Every (query, key) pair the bottom-right causal mask allows is in exactly one piece."""
    for lq, lk in [(5, 5), (3, 8), (8, 3), (1, 1), (4, 0), (0, 4)]:
        seen = torch.zeros(lq, lk, dtype=torch.int64)
        for q0, q1, k0, k1, causal in _pieces(lq, lk, True):
            block = torch.ones(q1 - q0, k1 - k0, dtype=torch.int64)
            seen[q0:q1, k0:k1] += block.tril() if causal else block
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq
        assert torch.equal(seen, allowed.long()), (lq, lk, seen)
