"""Triton chunked causal linear attention, forward and backward, native varlen.

Per document (a batch row, or a ``cu_seqlens`` slice of the packed stream) and head, with log
decay ``g_t <= 0``: ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``.

One program per (document, head, block of BV value columns) walks the document's chunks of C
tokens keeping the fp32 state ``S`` ``[BK, BV]`` in registers. With ``G`` the cumulative log
decay inside the chunk (``G_t = g_1 + ... + g_t``, ``G_C`` its last value) and ``S`` the state
entering the chunk:

    o = scale * ((q * exp(G)) @ S + ((q @ k^T) * D) @ v),   D[t, s] = exp(G_t - G_s) [s <= t]
    S <- exp(G_C) S + (k * exp(G_C - G))^T @ v

Backward (``dS`` = gradient of the state leaving the chunk, starting from d final_state), two
kernels on the same grid: ``_bwd_dq``, a forward sweep recomputing ``S`` for
``dq = scale * (exp(G) * (do @ S^T) + ((do @ v^T) * D) @ k)`` (and, when ``dg`` is wanted,
storing the state entering every chunk), and ``_bwd_dkv``, a reverse sweep:

    dv = scale * ((q @ k^T) * D)^T @ do + (k * exp(G_C - G)) @ dS
    dk = scale * ((do @ v^T) * D)^T @ q + exp(G_C - G) * (v @ dS^T)
    dS <- exp(G_C) dS + scale * (q * exp(G))^T @ do        (d initial_state at the start)

``dq`` / ``dk`` / ``dg`` sum over value blocks (partials summed in torch). The log decay
``g_r`` of token ``r`` scales every path that crosses it: a pair ``s < r <= t`` of the
attention, the entering state ``S`` read at ``t >= r`` and, through the leaving state, the
tokens ``s < r`` and ``S`` itself. Per chunk, ``_bwd_dkv`` sums exactly those terms, each with
its own exponent (``_decay_grad_chunk``):

    dg_r = sum_{s < r <= t} scale (q_t . k_s)(do_t . v_s) D[t, s]       (pairs inside the chunk)
         + sum_{t >= r} scale exp(G_t) q_t . (S do_t^T)                  (entering state)
         + sum_{s < r} exp(G_C - G_s) k_s . (v_s dS^T)                   (leaving state: tokens)
         + exp(G_C) sum(dS * S)                                          (leaving state: S)

Nothing is a difference of two larger numbers, so ``dg`` is accurate relative to its own size
even when it is ~exp(-30) under strong decays. (The textbook identity
``dg = revcumsum(q . dq - k . dk)`` plus the final-state term cancels catastrophically there:
fp32 rel errors of 1e-3 at a constant log decay of -10 and ~1e6 at -30.) The price is a
backward-only buffer of the state entering every chunk, ``(T / C + N) x H x K x V`` in the input
dtype, allocated only when ``g`` needs a gradient.
``tl.dot`` operands are rounded to the input dtype (the fp32 state too), accumulation and the
carried state are fp32; fp32 inputs use IEEE fp32 dots (no TF32). Under the interpreter the rounded operands are upcast to fp32 (numpy has no bf16).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

CHUNK = 16  # tokens per chunk (power of two >= 16)
MAX_BV = 64  # widest block of value columns per program
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, PREC: tl.constexpr, F32: tl.constexpr):
    """``a @ b`` accumulated in fp32 (operands upcast under the interpreter)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tile(P, bos, rows, r_ok, h, H, D, cols, c_ok):
    """``[C, BD]`` tile of a packed ``[total, H, D]`` tensor: rows ``bos + rows``, zero outside."""
    return tl.load(P + ((bos + rows)[:, None] * H + h) * D + cols[None, :],
                   mask=r_ok[:, None] & c_ok[None, :], other=0.0)


@triton.jit
def _chunk_decays(G, bos, rows, r_ok, h, H, offs_c, HAS_G: tl.constexpr, C: tl.constexpr):
    """Decays of one chunk, every exponent a sum of log decays (<= 0) summed on its own:
    ``cum`` ``[C]`` (``G_t``, from the chunk start; padding rows add 0), ``last`` (``G_C``),
    ``dmat`` ``[C, C]`` (``D[t, s] = exp(g_{s+1} + ... + g_t)`` for ``s <= t``, else 0) and
    ``to_end`` ``[C]`` (``exp(g_{s+1} + ... + g_C)``). The segment sums come from a masked
    cumulative sum (Mamba-2's ``segsum``), not from ``G_t - G_s``, which cancels after strong decays."""
    if HAS_G:
        g = tl.load(G + (bos + rows) * H + h, mask=r_ok, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([C], tl.float32)
    cum = tl.cumsum(g, 0)
    last = tl.sum(tl.where(offs_c == C - 1, cum, 0.0), 0)
    terms = tl.where(offs_c[:, None] > offs_c[None, :], g[:, None], 0.0)  # [C(r), C(s)]: g_r for r > s
    seg = tl.cumsum(terms, 0)  # [C(t), C(s)]: g_{s+1} + ... + g_t
    dmat = tl.where(offs_c[:, None] >= offs_c[None, :], tl.exp(seg), 0.0)
    to_end = tl.exp(tl.sum(tl.where(offs_c[:, None] == C - 1, seg, 0.0), 0))  # row C - 1
    return cum, last, dmat, to_end


@triton.jit
def _state_ptrs(P, n, h, H, DK, DV, offs_k, offs_v):
    """Pointers of the ``[BK, BV]`` block of a ``[N, H, DK, DV]`` state tensor."""
    return P + ((n * H + h) * DK + offs_k[:, None]) * DV + offs_v[None, :]


@triton.jit
def _advance(state, k, v, to_end, last, PREC: tl.constexpr, F32: tl.constexpr):
    """State after the chunk: ``exp(G_C) S + (k * exp(G_C - G))^T @ v`` (``[BK, BV]`` fp32)."""
    k_dec = (k * to_end[:, None]).to(k.dtype)  # [C, BK]
    return state * tl.exp(last) + _dot(tl.trans(k_dec), v, PREC, F32)


@triton.jit
def _load_state(P, n, h, H, DK, DV, offs_k, offs_v, s_mask, PRESENT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr):
    """``[BK, BV]`` fp32 block of a state tensor, zeros when it is absent."""
    if PRESENT:
        return tl.load(_state_ptrs(P, n, h, H, DK, DV, offs_k, offs_v), mask=s_mask, other=0.0)
    return tl.zeros([BK, BV], tl.float32)


@triton.jit
def _fwd(Q, K, V, G, S0, O, SF, CU, scale, H, DK, DV,
         HAS_G: tl.constexpr, HAS_INIT: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
         BV: tl.constexpr, PREC: tl.constexpr, F32: tl.constexpr):
    """o and the final state of one (document, head, value block)."""
    n, h, iv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(CU + n).to(tl.int64)  # 64-bit row offsets for long packed streams
    length = tl.load(CU + n + 1) - bos
    offs_c, offs_k, offs_v = tl.arange(0, C), tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    k_ok, v_ok = offs_k < DK, offs_v < DV
    s_mask = k_ok[:, None] & v_ok[None, :]
    dt = Q.dtype.element_ty
    state = _load_state(S0, n, h, H, DK, DV, offs_k, offs_v, s_mask, HAS_INIT, BK, BV)  # S [BK, BV]
    for c0 in range(0, length, C):
        rows = c0 + offs_c
        r_ok = rows < length
        q = _tile(Q, bos, rows, r_ok, h, H, DK, offs_k, k_ok)  # [C, BK]
        k = _tile(K, bos, rows, r_ok, h, H, DK, offs_k, k_ok)  # [C, BK]
        v = _tile(V, bos, rows, r_ok, h, H, DV, offs_v, v_ok)  # [C, BV]
        cum, last, dmat, to_end = _chunk_decays(G, bos, rows, r_ok, h, H, offs_c, HAS_G, C)
        scores = _dot(q, tl.trans(k), PREC, F32) * dmat  # [C, C]
        o = _dot((q * tl.exp(cum)[:, None]).to(dt), state.to(dt), PREC, F32) \
            + _dot(scores.to(dt), v, PREC, F32)  # [C, BV]
        tl.store(O + ((bos + rows)[:, None] * H + h) * DV + offs_v[None, :], (scale * o).to(O.dtype.element_ty),
                 mask=r_ok[:, None] & v_ok[None, :])
        state = _advance(state, k, v, to_end, last, PREC, F32)
    tl.store(_state_ptrs(SF, n, h, H, DK, DV, offs_k, offs_v), state, mask=s_mask)


@triton.jit
def _bwd_dq(Q, K, V, G, S0, DO, DQ, SC, CO, CU, scale, H, DK, DV, nv_stride,
            HAS_G: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DG: tl.constexpr, C: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, F32: tl.constexpr):
    """Forward sweep recomputing S: dq of one value block (``DQ`` ``[NV, total, H, K]`` partials);
    with ``HAS_DG`` also the state entering each chunk (``SC`` ``[chunks, H, K, V]``, document
    ``n``'s first chunk at ``CO[n]``)."""
    n, h, iv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(CU + n).to(tl.int64)
    length = tl.load(CU + n + 1) - bos
    offs_c, offs_k, offs_v = tl.arange(0, C), tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    k_ok, v_ok = offs_k < DK, offs_v < DV
    s_mask = k_ok[:, None] & v_ok[None, :]
    dt = Q.dtype.element_ty
    state = _load_state(S0, n, h, H, DK, DV, offs_k, offs_v, s_mask, HAS_INIT, BK, BV)
    for c0 in range(0, length, C):
        rows = c0 + offs_c
        r_ok = rows < length
        if HAS_DG:
            slot = tl.load(CO + n).to(tl.int64) + c0 // C
            tl.store(_state_ptrs(SC, slot, h, H, DK, DV, offs_k, offs_v), state.to(SC.dtype.element_ty),
                     mask=s_mask)
        k = _tile(K, bos, rows, r_ok, h, H, DK, offs_k, k_ok)  # [C, BK]
        v = _tile(V, bos, rows, r_ok, h, H, DV, offs_v, v_ok)  # [C, BV]
        do = _tile(DO, bos, rows, r_ok, h, H, DV, offs_v, v_ok)  # [C, BV]
        cum, last, dmat, to_end = _chunk_decays(G, bos, rows, r_ok, h, H, offs_c, HAS_G, C)
        dp = _dot(do, tl.trans(v), PREC, F32) * dmat  # [C, C]
        dq = tl.exp(cum)[:, None] * _dot(do, tl.trans(state.to(dt)), PREC, F32) \
            + _dot(dp.to(dt), k, PREC, F32)  # [C, BK]
        tl.store(DQ + iv * nv_stride + ((bos + rows)[:, None] * H + h) * DK + offs_k[None, :], scale * dq,
                 mask=r_ok[:, None] & k_ok[None, :])
        state = _advance(state, k, v, to_end, last, PREC, F32)


@triton.jit
def _decay_grad_chunk(q, k, qk, dov, sdo, vds, s_in, dstate, cum, last, dmat, to_end, scale, offs_c):
    """``dg`` ``[C]`` of one chunk (one value block's part), every term with its own exponent:
    pairs ``s < r <= t`` inside the chunk, the entering state ``s_in`` read at ``t >= r``, the
    leaving state's tokens ``s < r`` and ``s_in`` itself (``qk = q @ k^T``, ``dov = do @ v^T``,
    ``sdo = do @ s_in^T``, ``vds = v @ dS^T``, all fp32)."""
    strict = tl.where(offs_c[:, None] > offs_c[None, :], dmat, 0.0)  # [C(t), C(s)], s < t
    later = tl.cumsum(scale * qk * dov * strict, 0, reverse=True)  # [C(r), C(s)]: sum over t >= r
    pairs = tl.sum(tl.where(offs_c[None, :] < offs_c[:, None], later, 0.0), 1)  # [C(r)]: s < r
    reads = scale * tl.exp(cum) * tl.sum(q.to(tl.float32) * sdo, 1)  # [C(t)]
    writes = to_end * tl.sum(k.to(tl.float32) * vds, 1)  # [C(s)]
    after = tl.sum(tl.where(offs_c[:, None] >= offs_c[None, :], reads[:, None], 0.0), 0)  # [C(r)]: t >= r
    before = tl.sum(tl.where(offs_c[:, None] < offs_c[None, :], writes[:, None], 0.0), 0)  # [C(r)]: s < r
    carried = tl.exp(last) * tl.sum(tl.sum(dstate * s_in, 1), 0)
    return pairs + after + before + carried


@triton.jit
def _bwd_dkv(Q, K, V, G, DO, DSF, DK_, DV_, DS0, DG_, SC, CO, CU, scale, H, DK, DV, nv_stride, dg_stride,
             HAS_G: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DSF: tl.constexpr, HAS_DG: tl.constexpr,
             C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, F32: tl.constexpr):
    """Reverse sweep carrying dS from d final_state: dv, dk and dg partials, d initial_state."""
    n, h, iv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(CU + n).to(tl.int64)
    length = tl.load(CU + n + 1) - bos
    offs_c, offs_k, offs_v = tl.arange(0, C), tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    k_ok, v_ok = offs_k < DK, offs_v < DV
    s_mask = k_ok[:, None] & v_ok[None, :]
    dt = Q.dtype.element_ty
    dstate = _load_state(DSF, n, h, H, DK, DV, offs_k, offs_v, s_mask, HAS_DSF, BK, BV)  # dS [BK, BV]
    n_chunks = tl.cdiv(length, C)
    for j in range(0, n_chunks):
        jc = n_chunks - 1 - j
        rows = jc * C + offs_c
        r_ok = rows < length
        q = _tile(Q, bos, rows, r_ok, h, H, DK, offs_k, k_ok)
        k = _tile(K, bos, rows, r_ok, h, H, DK, offs_k, k_ok)
        v = _tile(V, bos, rows, r_ok, h, H, DV, offs_v, v_ok)
        do = _tile(DO, bos, rows, r_ok, h, H, DV, offs_v, v_ok)
        cum, last, dmat, to_end = _chunk_decays(G, bos, rows, r_ok, h, H, offs_c, HAS_G, C)
        qk = _dot(q, tl.trans(k), PREC, F32)  # [C(t), C(s)]
        dov = _dot(do, tl.trans(v), PREC, F32)  # [C(t), C(s)]
        ds = dstate.to(dt)
        vds = _dot(v, tl.trans(ds), PREC, F32)  # [C, BK]
        dv = scale * _dot(tl.trans((qk * dmat).to(dt)), do, PREC, F32) \
            + _dot((k * to_end[:, None]).to(dt), ds, PREC, F32)
        dk = scale * _dot(tl.trans((dov * dmat).to(dt)), q, PREC, F32) + to_end[:, None] * vds
        tl.store(DV_ + ((bos + rows)[:, None] * H + h) * DV + offs_v[None, :], dv,
                 mask=r_ok[:, None] & v_ok[None, :])
        tl.store(DK_ + iv * nv_stride + ((bos + rows)[:, None] * H + h) * DK + offs_k[None, :], dk,
                 mask=r_ok[:, None] & k_ok[None, :])
        if HAS_DG:
            slot = tl.load(CO + n).to(tl.int64) + jc
            s_in = tl.load(_state_ptrs(SC, slot, h, H, DK, DV, offs_k, offs_v), mask=s_mask, other=0.0)
            sdo = _dot(do, tl.trans(s_in.to(dt)), PREC, F32)  # [C, BK]
            dg = _decay_grad_chunk(q, k, qk, dov, sdo, vds, s_in.to(tl.float32), dstate, cum, last, dmat,
                                   to_end, scale, offs_c)
            tl.store(DG_ + iv * dg_stride + (bos + rows) * H + h, dg, mask=r_ok)
        q_dec = (q * tl.exp(cum)[:, None]).to(dt)
        dstate = dstate * tl.exp(last) + scale * _dot(tl.trans(q_dec), do, PREC, F32)
    if HAS_INIT:
        tl.store(_state_ptrs(DS0, n, h, H, DK, DV, offs_k, offs_v), dstate, mask=s_mask)


def _blocks(dk, dv):
    """(BK, BV, number of value blocks): tl.dot needs every dim >= 16 and a power of two."""
    bk = max(16, triton.next_power_of_2(dk))
    bv = min(max(16, triton.next_power_of_2(dv)), max(16, MAX_BV))
    return bk, bv, triton.cdiv(dv, bv)


def _doc_bounds(q, cu_seqlens):
    """int32 ``[N + 1]`` document starts in the packed ``[B * T]`` stream (a batch row is a document)."""
    b, t = q.shape[:2]
    if cu_seqlens is None:
        return torch.arange(b + 1, dtype=torch.int32, device=q.device) * t
    assert b == 1, f"with cu_seqlens the batch must be 1, got {b}"
    return cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()


def _packed(x):
    """``[B, T, H, D]`` -> contiguous ``[B * T, H, D]`` (``[B, T, H]`` -> ``[B * T, H]``)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _consts(q):
    """Launch constants: chunk size, IEEE fp32 dots for fp32 inputs, interpreter upcasts."""
    return dict(C=CHUNK, PREC="ieee" if q.dtype == torch.float32 else "tf32", F32=INTERPRET)


def _forward(q, k, v, g, s0, cu, scale):
    """Packed q, k ``[TT, H, K]``, v ``[TT, H, V]``, g ``[TT, H]`` ->
    o ``[TT, H, V]`` like q, final state ``[N, H, K, V]`` fp32."""
    tt, h, dk = q.shape
    dv, n = v.shape[-1], cu.numel() - 1
    bk, bv, nv = _blocks(dk, dv)
    o = torch.zeros(tt, h, dv, dtype=q.dtype, device=q.device)
    final = torch.zeros(n, h, dk, dv, dtype=torch.float32, device=q.device)
    if n > 0 and h > 0:
        _fwd[(n, h, nv)](q, k, v, q if g is None else g, final if s0 is None else s0, o, final, cu, scale,
                         h, dk, dv, HAS_G=g is not None, HAS_INIT=s0 is not None, BK=bk, BV=bv, **_consts(q))
    return o, final


def _chunk_starts(cu, chunk):
    """int32 ``[N + 1]``: where each document's chunks start in the per-chunk state buffer."""
    n_chunks = (cu[1:] - cu[:-1] + chunk - 1) // chunk
    return torch.cat([cu.new_zeros(1), n_chunks.cumsum(0)]).to(torch.int32)


def _backward(q, k, v, g, s0, do, dsf, cu, scale, want_dg):
    """dq, dk ``[TT, H, K]``, dv ``[TT, H, V]`` fp32, d initial_state (fp32, or None) and
    dg ``[TT, H]`` fp32 (or None unless ``want_dg``)."""
    tt, h, dk = q.shape
    dv, n = v.shape[-1], cu.numel() - 1
    bk, bv, nv = _blocks(dk, dv)
    consts = _consts(q)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq_parts, dk_parts = torch.zeros(nv, tt, h, dk, **f32), torch.zeros(nv, tt, h, dk, **f32)
    dv_out = torch.zeros(tt, h, dv, **f32)
    ds0 = None if s0 is None else torch.zeros(n, h, dk, dv, **f32)
    want_dg = want_dg and g is not None
    dg_parts = torch.zeros(nv, tt, h, **f32) if want_dg else None
    if n > 0 and h > 0:
        common = dict(HAS_G=g is not None, HAS_INIT=s0 is not None, HAS_DG=want_dg, BK=bk, BV=bv, **consts)
        g_, s0_ = (q if g is None else g), (q if s0 is None else s0)  # unread placeholders when absent
        # the state entering every chunk (a document of L tokens has ceil(L / C) <= L / C + 1 chunks;
        # the bound avoids reading cu_seqlens back to the host)
        states = torch.empty(tt // consts["C"] + n, h, dk, dv, dtype=q.dtype, device=q.device) if want_dg else q
        starts = _chunk_starts(cu, consts["C"]) if want_dg else cu
        _bwd_dq[(n, h, nv)](q, k, v, g_, s0_, do, dq_parts, states, starts, cu, scale, h, dk, dv, tt * h * dk,
                            **common)
        dsf_, ds0_, dg_ = (q if dsf is None else dsf), (q if ds0 is None else ds0), (q if dg_parts is None
                                                                                     else dg_parts)
        _bwd_dkv[(n, h, nv)](q, k, v, g_, do, dsf_, dk_parts, dv_out, ds0_, dg_, states, starts, cu, scale, h, dk,
                             dv, tt * h * dk, tt * h, HAS_DSF=dsf is not None, **common)
    return dq_parts.sum(0), dk_parts.sum(0), dv_out, ds0, (None if dg_parts is None else dg_parts.sum(0))


class _ChunkLinearAttention(torch.autograd.Function):
    """Triton forward; backward = recompute sweep (dq, entering states) + reverse sweep (dk, dv,
    dg, d initial_state)."""

    @staticmethod
    def forward(ctx, q, k, v, g, s0, cu, scale):
        o, final = _forward(q, k, v, g, s0, cu, scale)
        ctx.save_for_backward(q, k, v, g, s0, cu)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dsf):
        q, k, v, g, s0, cu = ctx.saved_tensors
        do = torch.zeros(*q.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device) if do is None \
            else do.to(q.dtype).contiguous()
        dsf = None if dsf is None else dsf.float().contiguous()
        dq, dk, dv, ds0, dg = _backward(q, k, v, g, s0, do, dsf, cu, ctx.scale, ctx.needs_input_grad[3])
        dg = None if dg is None else dg.to(g.dtype)
        ds0 = None if ds0 is None else ds0.to(s0.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, ds0, None, None


def triton_linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
                            cu_seqlens=None):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H]`` -> (o ``[B, T, H, V]`` like q,
    final state fp32 ``[B or N, H, K, V]`` or None); same contract as ``linear_attention``."""
    b, t, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    cu = _doc_bounds(q, cu_seqlens)
    v = v.to(q.dtype)
    q2, k2, v2 = _packed(q), _packed(k.to(q.dtype)), _packed(v)
    g2 = None if g is None else _packed(g)
    s0 = None if initial_state is None else initial_state.float().contiguous()
    assert s0 is None or s0.shape == (cu.numel() - 1, h, dk, v.shape[-1]), f"initial_state {tuple(s0.shape)}"
    o, final = _ChunkLinearAttention.apply(q2, k2, v2, g2, s0, cu, float(scale))
    return o.view(b, t, h, v.shape[-1]), (final if output_final_state else None)
