"""Triton varlen flash attention (Dao, 2023: FlashAttention-2), forward and backward.

Packed ``[total, heads, head_dim]`` with ``cu_seqlens`` per document, GQA by head count, causal
aligned bottom-right (query j of a length-Lq document sees keys ``<= j + Lk - Lq``), fp32
log-sum-exp ``[heads, total_q]``. Sliding windows, chunks and soft-capping (``masks.py``): the
key loop of a query tile covers only the tiles its window or chunk reaches (and the dK/dV loop only
the query tiles that reach its keys), so a window of W costs O(L * W); the plain causal / full
kernels compile exactly as before (``BANDED`` / ``CAPPED`` are compile-time switches). One program per (query block of a document, head) in the
forward pass (online softmax); the backward pass runs one kernel over key blocks (dK, dV, per
query head, GQA groups summed afterwards) and one over query blocks (dQ), so no atomics are
needed and results are deterministic. ``delta = rowsum(dO * O)`` is computed in torch.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N = 16, 16
# The interpreter's tl.dot cannot multiply bf16/fp16 operands (numpy has no bf16): upcast there
# only; compiled kernels keep low-precision operands for the tensor cores.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _band_ok(ok, prow, cols, LEFT, RIGHT, CHUNK):
    """``ok`` [rows, cols] narrowed to the window ``[p - LEFT, p + RIGHT]`` (-1: unbounded) and to
    the query's chunk (``CHUNK`` > 0); ``prow`` are the rows' key-coordinate positions."""
    d = cols[None, :] - prow[:, None]
    ok = ok & ((LEFT < 0) | (d >= -LEFT)) & ((RIGHT < 0) | (d <= RIGHT))
    c = tl.maximum(CHUNK, 1)
    same = (cols[None, :] // c == prow[:, None] // c) & (prow >= 0)[:, None]  # C division: keep p >= 0
    return ok & ((CHUNK <= 0) | same)


@triton.jit
def _cap(s, SOFTCAP):
    """``(SOFTCAP * tanh(s / SOFTCAP), 1 - tanh^2)``."""
    t = 2.0 * tl.sigmoid(2.0 * s / SOFTCAP) - 1.0
    return t * SOFTCAP, 1.0 - t * t


@triton.jit
def _key_range(p_lo, p_hi, lk, LEFT, RIGHT, CHUNK, BN: tl.constexpr):
    """Key tiles ``[start, end)`` that queries at positions ``[p_lo, p_hi]`` can see (band only)."""
    lo = tl.where(LEFT >= 0, p_lo - LEFT, 0)
    hi = tl.where(RIGHT >= 0, p_hi + RIGHT + 1, lk)
    c = tl.maximum(CHUNK, 1)
    lo = tl.where(CHUNK > 0, tl.maximum(lo, tl.maximum(p_lo, 0) // c * c), lo)
    hi = tl.where(CHUNK > 0, tl.minimum(hi, (tl.maximum(p_hi, 0) // c + 1) * c), hi)
    return tl.maximum(lo, 0) // BN * BN, tl.minimum(hi, lk)


@triton.jit
def _fwd(Q, K, V, O, LSE, CU_Q, CU_K, BLK_DOC, BLK_START, scale, n_heads, n_kv, head_dim, LEFT, RIGHT, CHUNK,
         SOFTCAP, CAUSAL: tl.constexpr, BANDED: tl.constexpr, CAPPED: tl.constexpr, BM: tl.constexpr,
         BN: tl.constexpr, BD: tl.constexpr, F32: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    doc, qs = tl.load(BLK_DOC + pid), tl.load(BLK_START + pid)
    q0, k0 = tl.load(CU_Q + doc), tl.load(CU_K + doc)
    lq, lk = tl.load(CU_Q + doc + 1) - q0, tl.load(CU_K + doc + 1) - k0
    hk = h // (n_heads // n_kv)
    offs_m, offs_n, offs_d = qs + tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BD)
    d_ok = offs_d < head_dim
    q = tl.load(Q + ((q0 + offs_m)[:, None] * n_heads + h) * head_dim + offs_d[None, :],
                mask=(offs_m < lq)[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    end = lk
    if CAUSAL:
        end = tl.minimum(lk, qs + BM + lk - lq)
    first = 0
    if BANDED:
        first, band_end = _key_range(qs + lk - lq, qs + BM - 1 + lk - lq, lk, LEFT, RIGHT, CHUNK, BN)
        end = tl.minimum(end, band_end)
    for start in range(first, end, BN):
        cols = start + offs_n
        kt = tl.load(K + ((k0 + cols)[None, :] * n_kv + hk) * head_dim + offs_d[:, None],
                     mask=(cols < lk)[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, kt, F32) * scale
        if CAPPED:
            s, _ = _cap(s, SOFTCAP)
        ok = (cols < lk)[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None] + lk - lq)
        if BANDED:
            ok = _band_ok(ok, offs_m + lk - lq, cols, LEFT, RIGHT, CHUNK)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(V + ((k0 + cols)[:, None] * n_kv + hk) * head_dim + offs_d[None, :],
                    mask=(cols < lk)[:, None] & d_ok[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    rows = offs_m < lq
    tl.store(O + ((q0 + offs_m)[:, None] * n_heads + h) * head_dim + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=rows[:, None] & d_ok[None, :])
    tl.store(LSE + (q0 + offs_m) * n_heads + h, lse, mask=rows)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, BLK_DOC, BLK_START, scale, n_heads, n_kv,
              head_dim, LEFT, RIGHT, CHUNK, SOFTCAP, CAUSAL: tl.constexpr, BANDED: tl.constexpr,
              CAPPED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, F32: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    doc, ks = tl.load(BLK_DOC + pid), tl.load(BLK_START + pid)
    q0, k0 = tl.load(CU_Q + doc), tl.load(CU_K + doc)
    lq, lk = tl.load(CU_Q + doc + 1) - q0, tl.load(CU_K + doc + 1) - k0
    hk = h // (n_heads // n_kv)
    offs_m, offs_n, offs_d = tl.arange(0, BM), ks + tl.arange(0, BN), tl.arange(0, BD)
    d_ok = offs_d < head_dim
    kv_mask = (offs_n < lk)[:, None] & d_ok[None, :]
    k = tl.load(K + ((k0 + offs_n)[:, None] * n_kv + hk) * head_dim + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + ((k0 + offs_n)[:, None] * n_kv + hk) * head_dim + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    first = 0
    last = lq
    if CAUSAL:
        first = tl.maximum(ks - (lk - lq), 0) // BM * BM
    if BANDED:  # rows whose window or chunk reaches keys [ks, ks + BN)
        off = lk - lq
        first = tl.maximum(first, tl.where(RIGHT >= 0, ks - RIGHT - off, 0))
        last = tl.minimum(last, tl.where(LEFT >= 0, ks + BN + LEFT - off, lq))
        c = tl.maximum(CHUNK, 1)
        first = tl.where(CHUNK > 0, tl.maximum(first, ks // c * c - off), first)
        last = tl.where(CHUNK > 0, tl.minimum(last, ((ks + BN - 1) // c + 1) * c - off), last)
        first = tl.maximum(first, 0) // BM * BM
    for start in range(first, last, BM):
        rows = start + offs_m
        r_ok = rows < lq
        q = tl.load(Q + ((q0 + rows)[:, None] * n_heads + h) * head_dim + offs_d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + ((q0 + rows)[:, None] * n_heads + h) * head_dim + offs_d[None, :],
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + (q0 + rows) * n_heads + h, mask=r_ok, other=float("-inf"))
        delta = tl.load(DELTA + (q0 + rows) * n_heads + h, mask=r_ok, other=0.0)
        s = _dot(q, tl.trans(k), F32) * scale
        dcap = 1.0
        if CAPPED:
            s, dcap = _cap(s, SOFTCAP)
        ok = r_ok[:, None] & (offs_n < lk)[None, :] & (lse > float("-inf"))[:, None]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= rows[:, None] + lk - lq)
        if BANDED:
            ok = _band_ok(ok, rows + lk - lq, offs_n, LEFT, RIGHT, CHUNK)
        p = tl.where(ok, tl.exp(s - tl.where(lse > float("-inf"), lse, 0.0)[:, None]), 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, F32)
        dp = _dot(do, tl.trans(v), F32)
        ds = p * (dp - delta[:, None]) * dcap
        dk += _dot(tl.trans(ds.to(q.dtype)), q, F32) * scale
    out_mask = (offs_n < lk)[:, None] & d_ok[None, :]
    tl.store(DK + ((k0 + offs_n)[:, None] * n_heads + h) * head_dim + offs_d[None, :], dk, mask=out_mask)
    tl.store(DV + ((k0 + offs_n)[:, None] * n_heads + h) * head_dim + offs_d[None, :], dv, mask=out_mask)


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, BLK_DOC, BLK_START, scale, n_heads, n_kv, head_dim,
            LEFT, RIGHT, CHUNK, SOFTCAP, CAUSAL: tl.constexpr, BANDED: tl.constexpr, CAPPED: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, F32: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    doc, qs = tl.load(BLK_DOC + pid), tl.load(BLK_START + pid)
    q0, k0 = tl.load(CU_Q + doc), tl.load(CU_K + doc)
    lq, lk = tl.load(CU_Q + doc + 1) - q0, tl.load(CU_K + doc + 1) - k0
    hk = h // (n_heads // n_kv)
    offs_m, offs_n, offs_d = qs + tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BD)
    d_ok = offs_d < head_dim
    r_ok = offs_m < lq
    q = tl.load(Q + ((q0 + offs_m)[:, None] * n_heads + h) * head_dim + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + ((q0 + offs_m)[:, None] * n_heads + h) * head_dim + offs_d[None, :],
                 mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + (q0 + offs_m) * n_heads + h, mask=r_ok, other=float("-inf"))
    delta = tl.load(DELTA + (q0 + offs_m) * n_heads + h, mask=r_ok, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    end = lk
    if CAUSAL:
        end = tl.minimum(lk, qs + BM + lk - lq)
    first = 0
    if BANDED:
        first, band_end = _key_range(qs + lk - lq, qs + BM - 1 + lk - lq, lk, LEFT, RIGHT, CHUNK, BN)
        end = tl.minimum(end, band_end)
    for start in range(first, end, BN):
        cols = start + offs_n
        c_ok = cols < lk
        k = tl.load(K + ((k0 + cols)[:, None] * n_kv + hk) * head_dim + offs_d[None, :],
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + ((k0 + cols)[:, None] * n_kv + hk) * head_dim + offs_d[None, :],
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), F32) * scale
        dcap = 1.0
        if CAPPED:
            s, dcap = _cap(s, SOFTCAP)
        ok = r_ok[:, None] & c_ok[None, :] & (lse > float("-inf"))[:, None]
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None] + lk - lq)
        if BANDED:
            ok = _band_ok(ok, offs_m + lk - lq, cols, LEFT, RIGHT, CHUNK)
        p = tl.where(ok, tl.exp(s - tl.where(lse > float("-inf"), lse, 0.0)[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), F32)
        ds = p * (dp - delta[:, None]) * dcap
        dq += _dot(ds.to(k.dtype), k, F32) * scale
    tl.store(DQ + ((q0 + offs_m)[:, None] * n_heads + h) * head_dim + offs_d[None, :], dq,
             mask=r_ok[:, None] & d_ok[None, :])


def _blocks(cu, block):
    """(document, start) of every ``block``-row tile of every document."""
    lens = (cu[1:] - cu[:-1]).tolist()
    docs = [d for d, n in enumerate(lens) for _ in range(0, n, block)]
    starts = [s for n in lens for s in range(0, n, block)]
    return (torch.tensor(docs, dtype=torch.int32, device=cu.device),
            torch.tensor(starts, dtype=torch.int32, device=cu.device))


def _prep(q, k, softmax_scale, cu_q, cu_k):
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return (scale, cu_q.to(q.device, torch.int32).contiguous(), cu_k.to(q.device, torch.int32).contiguous(),
            max(16, triton.next_power_of_2(q.shape[-1])))


def _pattern(mask):
    """Runtime band / soft-cap arguments and their compile-time switches (plain calls compile as before)."""
    if mask is None:
        return (-1, -1, 0, 0.0), dict(BANDED=False, CAPPED=False)
    return (mask.left, mask.right, mask.chunk, mask.softcap), dict(BANDED=mask.banded, CAPPED=mask.softcap > 0)


def triton_attention_forward(q, k, v, cu_q, cu_k, causal, softmax_scale=None, mask=None):
    """``(out, lse)``: out like q, lse fp32 ``[H, total_q]``; ``mask`` (``masks.Mask``) adds a
    window, chunks or a soft-cap."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    scale, cu_q, cu_k, bd = _prep(q, k, softmax_scale, cu_q, cu_k)
    out = torch.zeros_like(q)
    lse_t = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    docs, starts = _blocks(cu_q, BLOCK_M)
    args, flags = _pattern(mask)
    if len(docs):
        _fwd[(len(docs), q.shape[1])](q, k, v, out, lse_t, cu_q, cu_k, docs, starts, scale, q.shape[1],
                                      k.shape[1], q.shape[2], *args, CAUSAL=causal, BM=BLOCK_M, BN=BLOCK_N, BD=bd,
                                      F32=INTERPRET, **flags)
    return out, lse_t.t().contiguous()


def triton_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, softmax_scale=None, mask=None):
    """dq, dk, dv given the final ``out`` and ``lse`` (dk/dv in the kv-head shape)."""
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    scale, cu_q, cu_k, bd = _prep(q, k, softmax_scale, cu_q, cu_k)
    n_heads, n_kv = q.shape[1], k.shape[1]
    lse_t = lse.t().contiguous()  # [total_q, H]
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # [total_q, H]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_h = torch.zeros(k.shape[0], n_heads, k.shape[2], dtype=torch.float32, device=q.device)
    dv_h = torch.zeros_like(dk_h)
    kdocs, kstarts = _blocks(cu_k, BLOCK_N)
    args, flags = _pattern(mask)
    common = dict(CAUSAL=causal, BM=BLOCK_M, BN=BLOCK_N, BD=bd, F32=INTERPRET, **flags)
    if len(kdocs):
        _bwd_dkdv[(len(kdocs), n_heads)](q, k, v, dout, lse_t, delta, dk_h, dv_h, cu_q, cu_k, kdocs, kstarts,
                                         scale, n_heads, n_kv, q.shape[2], *args, **common)
    qdocs, qstarts = _blocks(cu_q, BLOCK_M)
    if len(qdocs):
        _bwd_dq[(len(qdocs), n_heads)](q, k, v, dout, lse_t, delta, dq, cu_q, cu_k, qdocs, qstarts, scale,
                                       n_heads, n_kv, q.shape[2], *args, **common)
    group = n_heads // n_kv  # [Tk, H, D] -> [Tk, H_kv, D]: sum each kv head's query group
    dk = dk_h.view(k.shape[0], n_kv, group, k.shape[2]).sum(2)
    dv = dv_h.view(k.shape[0], n_kv, group, k.shape[2]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
