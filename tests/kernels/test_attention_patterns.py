"""Sliding windows, soft-capping, chunked attention and sinks (issue #29) on every attention path:
the dense reference against the definition, then blockwise, the CPU dispatch and the Triton
kernels (under TRITON_INTERPRET=1, no fallback allowed) against the reference, forward (out, lse)
and backward (dq, dk, dv, dsinks)."""
import math

import pytest
import torch

from seqshard.kernels.attention import attention, attention_backward, attention_forward, attention_reference
from seqshard.kernels.attention.blockwise import _doc_blocks
from seqshard.kernels.attention.masks import make_mask

TOL = 2e-5  # fp32, relative to the largest magnitude

# (q lengths, k lengths, heads, kv heads, causal, pattern)
CASES = [
    ([40, 13], [40, 13], 4, 2, True, dict(window_size=(7, 0))),
    ([33], [33], 2, 2, True, dict(window_size=(3, -1), softcap=5.0)),
    ([30, 9], [30, 9], 2, 1, False, dict(window_size=(4, 2))),
    ([37], [37], 2, 2, True, dict(chunk_size=8)),
    ([25, 6], [25, 6], 4, 2, True, dict(sinks=True)),
    ([50], [50], 4, 1, True, dict(window_size=(5, 0), softcap=2.0, sinks=True)),
    ([6, 9], [19, 9], 2, 2, True, dict(window_size=(4, 0))),  # Lq < Lk, bottom-right
    ([9, 3], [4, 3], 2, 1, True, dict(window_size=(2, 0), sinks=True)),  # Lq > Lk: empty rows
    ([20], [20], 2, 2, False, dict(chunk_size=6, softcap=3.0)),
]
IDS = [f"case{i}" for i in range(len(CASES))]


def make(lq, lk, heads, kv_heads, dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), heads, dim, generator=gen, dtype=dtype)
    k = torch.randn(sum(lk), kv_heads, dim, generator=gen, dtype=dtype)
    v = torch.randn(sum(lk), kv_heads, dim, generator=gen, dtype=dtype)
    dout = torch.randn(sum(lq), heads, dim, generator=gen, dtype=dtype)
    sinks = torch.randn(heads, generator=gen, dtype=dtype)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, dout, sinks, cu(lq), cu(lk)


def close(name, got, want, tol=TOL):
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), f"{name}: -inf pattern differs"
    err = (got[fin].double() - want[fin].double()).abs().max() / want[fin].double().abs().max().clamp_min(1e-6)
    assert err <= tol, f"{name}: rel err {err:.2e}"


def definition(q, k, v, causal, window_size=(-1, -1), softcap=0.0, chunk_size=None, sinks=None):
    """One document, element by element from the flash-attn docstring (float64, autograd-able)."""
    lq, h, d = q.shape
    lk, group = k.shape[0], h // k.shape[1]
    left, right = window_size
    right = 0 if causal else right
    out = torch.zeros(lq, h, d, dtype=q.dtype)
    rows = []
    for i in range(lq):
        p = i + lk - lq
        seen = [j for j in range(lk) if (right < 0 or j <= p + right) and (left < 0 or j >= p - left)
                and (not chunk_size or j // chunk_size == p // chunk_size)]
        for hh in range(h):
            logits = [q[i, hh] @ k[j, hh // group] / math.sqrt(d) for j in seen]
            if softcap:
                logits = [softcap * torch.tanh(x / softcap) for x in logits]
            extra = [sinks[hh]] if sinks is not None else []
            if not logits:
                rows.append((i, hh, None))
                continue
            w = torch.softmax(torch.stack(logits + extra), 0)[:len(seen)]
            rows.append((i, hh, sum(w[n] * v[j, hh // group] for n, j in enumerate(seen))))
    for i, hh, o in rows:
        if o is not None:
            out[i, hh] = o
    return out


@pytest.mark.parametrize("case", [0, 1, 2, 3, 5, 8])
def test_reference_matches_the_definition(case):
    lq, lk, heads, kv, causal, pat = CASES[case]
    q, k, v, _, sinks, cu_q, cu_k = make(lq[:1], lk[:1], heads, kv, dim=4, dtype=torch.float64)
    pat = dict(pat, sinks=sinks if pat.get("sinks") else None)
    got = attention_reference(q, k, v, cu_q, cu_k, causal=causal, **pat)
    torch.testing.assert_close(got, definition(q, k, v, causal, **pat), rtol=1e-5, atol=1e-6)  # the reference scores in fp32


def _run_path(q, k, v, dout, sinks, cu_q, cu_k, causal, pat):
    """out, lse and the gradients through ``attention_forward`` / ``attention_backward``."""
    out, lse = attention_forward(q, k, v, cu_q, cu_k, None, None, causal, sinks=sinks, **pat)
    grads = attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, None, None, causal, sinks=sinks, **pat)
    return out, lse, grads


def _oracle(q, k, v, dout, sinks, cu_q, cu_k, causal, pat):
    ins = [t.clone().requires_grad_() for t in (q, k, v)] + ([sinks.clone().requires_grad_()] if sinks is not None
                                                            else [])
    out, lse = attention_reference(*ins[:3], cu_q, cu_k, causal=causal, return_lse=True,
                                   sinks=ins[3] if sinks is not None else None, **pat)
    out.backward(dout)
    return out.detach(), lse, [t.grad for t in ins]


@pytest.mark.parametrize("kernels", ["blockwise", "auto", "triton"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_paths_match_reference(monkeypatch, kernels, case):
    if kernels == "triton":
        pytest.importorskip("triton")
        import sys

        dispatch = sys.modules["seqshard.kernels.attention"]  # the package (its name is shadowed by the function)

        def no_fallback(*args, **kwargs):
            raise AssertionError("the Triton path fell back to blockwise")

        monkeypatch.setattr(dispatch, "blockwise_attention_forward", no_fallback)
        monkeypatch.setattr(dispatch, "blockwise_attention_backward", no_fallback)
    monkeypatch.setenv("SEQSHARD_KERNELS", kernels)
    lq, lk, heads, kv, causal, pat = CASES[case]
    q, k, v, dout, sinks, cu_q, cu_k = make(lq, lk, heads, kv)
    sinks = sinks if pat.get("sinks") else None
    pat = {key: val for key, val in pat.items() if key != "sinks"}
    with monkeypatch.context() as m:
        m.setenv("SEQSHARD_KERNELS", "reference")
        ref_out, ref_lse, ref_grads = _oracle(q, k, v, dout, sinks, cu_q, cu_k, causal, pat)
    out, lse, grads = _run_path(q, k, v, dout, sinks, cu_q, cu_k, causal, pat)
    close("out", out, ref_out)
    close("lse", lse, ref_lse)
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        close(name, got, want)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    s_in = sinks.clone().requires_grad_() if sinks is not None else None
    attention(*ins, cu_q, cu_k, None, None, causal=causal, sinks=s_in, **pat).backward(dout)
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), [t.grad for t in ins] + [None if s_in is None else s_in.grad],
                               ref_grads):
        close(f"autograd {name}", got, want)


def test_positions_place_split_key_blocks(monkeypatch):
    """Two key halves with explicit positions, merged by lse, equal the whole document (ring's use)."""
    monkeypatch.setenv("SEQSHARD_KERNELS", "blockwise")
    q, k, v, _, _, cu, _ = make([24], [24], 2, 1)
    pat = dict(window_size=(5, 0), chunk_size=10)
    want, want_lse = attention_reference(q, k, v, cu, cu, causal=True, return_lse=True, **pat)
    qpos = torch.arange(12, 24)
    outs = []
    for k0 in (0, 12):
        cu_h = torch.tensor([0, 12], dtype=torch.int32)
        outs.append(attention_forward(q[12:], k[k0:k0 + 12], v[k0:k0 + 12], cu_h, cu_h, None, None, True,
                                      q_pos=qpos, k_pos=torch.arange(k0, k0 + 12), **pat))
    lse = torch.logaddexp(outs[0][1], outs[1][1])
    out = sum(o * torch.exp(blse - lse).nan_to_num(0.0).t().unsqueeze(-1) for o, blse in outs)
    close("out", out, want[12:])
    close("lse", lse, want_lse[:, 12:])


def test_window_blocks_cost_linear_in_length():
    """Blocks outside the window are skipped: computed scores grow as L * W, not L^2."""
    mask = make_mask(True, (255, 0))
    cost = {}
    for n in (4096, 8192, 16384):
        pos = torch.arange(n)
        cost[n] = sum((r1 - r0) * (k1 - k0) for r0, r1, k0, k1, _ in _doc_blocks(pos, pos, 4, mask))
        assert cost[n] <= n * (64 + 256), f"{n}: {cost[n]} scores for window 256"
    assert cost[16384] <= 4.2 * cost[4096], cost  # 4x the length, 4x the work


def test_chunk_blocks_never_cross_chunks():
    mask = make_mask(True, chunk_size=128)
    pos = torch.arange(1024)
    for r0, r1, k0, k1, _ in _doc_blocks(pos, pos, 2, mask):
        assert k0 // 128 == (r1 - 1) // 128 and k1 <= (r0 // 128 + 1) * 128, (r0, r1, k0, k1)


@pytest.mark.parametrize("kernels", ["blockwise", "triton"])
@pytest.mark.parametrize("case", [0, 5, 8])
def test_bf16_patterns_match_the_fp32_reference(monkeypatch, kernels, case):
    """bf16 inputs: out and the gradients within 3e-2 of the fp32 reference on the same values."""
    if kernels == "triton":
        pytest.importorskip("triton")
    lq, lk, heads, kv, causal, pat = CASES[case]
    q, k, v, dout, sinks, cu_q, cu_k = make(lq, lk, heads, kv, dtype=torch.bfloat16)
    sinks = sinks.float() if pat.get("sinks") else None
    pat = {key: val for key, val in pat.items() if key != "sinks"}
    ref_out, ref_lse, ref_grads = _oracle(*(t.float() for t in (q, k, v, dout)), sinks, cu_q, cu_k, causal, pat)
    monkeypatch.setenv("SEQSHARD_KERNELS", kernels)
    out, lse, grads = _run_path(q, k, v, dout, sinks, cu_q, cu_k, causal, pat)
    close("out", out, ref_out, 3e-2)
    close("lse", lse, ref_lse, 3e-2)
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        close(name, got, want, 3e-2)


def test_a_window_wider_than_every_document_runs_the_fast_kernel(monkeypatch):
    """Mistral's 4K window on 2K documents hides nothing: the CPU flash kernel runs (exact)."""
    import sys

    dispatch = sys.modules["seqshard.kernels.attention"]
    q, k, v, dout, _, cu, _ = make([30, 12], [30, 12], 2, 1)
    want = attention_reference(q, k, v, cu, cu, causal=True)
    for name in ("blockwise_attention_forward", "blockwise_attention_backward"):
        monkeypatch.setattr(dispatch, name, lambda *a, **kw: (_ for _ in ()).throw(AssertionError("blockwise")))
    monkeypatch.setenv("SEQSHARD_KERNELS", "auto")
    out = attention(q, k, v, cu, cu, causal=True, window_size=(4095, 0))
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    with pytest.raises(AssertionError, match="blockwise"):  # a window that cuts still goes blockwise
        attention(q, k, v, cu, cu, causal=True, window_size=(20, 0))
