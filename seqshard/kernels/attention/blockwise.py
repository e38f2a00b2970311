"""Blockwise varlen attention in plain torch, for any device: the fallback where neither Triton
nor PyTorch's CPU flash kernel applies (a non-CPU device without Triton).

Per document, the queries are taken in blocks of ``rows`` (sized so one block's scores stay under
``SCORE_BUDGET_BYTES``); a block's scores against the keys it can see (``[H, rows, Lk]`` in fp32)
are built, reduced to out and lse, and dropped. The backward recomputes them block by block from
``(q, k, v, out, lse)`` (FlashAttention-2's ``dS = P * (dP - rowsum(dO * O))``), so memory is
O(T * H * D + SCORE_BUDGET_BYTES), never ``[L, L]``. GQA without expanding k/v: the ``group``
query heads of a kv head are stacked as rows (``[H_kv, group * rows, D]`` against ``[H_kv, Lk, D]``).
Causal aligned bottom-right (query j of a length-Lq document sees keys ``<= j + Lk - Lq``); rows
that see no key return 0 with lse ``-inf`` and get no gradient. Sliding windows, chunks and
soft-capping (``masks.py``) on every device: a query block reads only the key columns its window
or chunk can reach (found by bisection on the key positions), so blocks outside are skipped, not
masked after computing.
"""
from __future__ import annotations

import bisect

import torch

from .masks import Mask, cap_scores, doc_positions, make_mask, visible

SCORE_BUDGET_BYTES = 64 << 20
MIN_BAND_ROWS = 64


def _doc_blocks(pq, pk, n_heads, mask: Mask):
    """``(r0, r1, k0, k1, visible)``: query rows ``[r0, r1)`` of a document, the key columns
    ``[k0, k1)`` they can see, and their ``[rows, k1 - k0]`` boolean mask (None: all visible).
    Blocks wholly outside the window or chunk are never produced; with a band of width W the
    query blocks are at most ``max(64, W / 4)`` rows (each reads at most rows + W keys), so a
    document costs O(L * W) time and O(W^2) score memory, whatever its length."""
    lq, lk = len(pq), len(pk)
    span = min(lk, mask.band) if mask.band else lk
    rows = max(16, SCORE_BUDGET_BYTES // max(1, 4 * n_heads * span))
    if mask.band:
        rows = min(rows, max(MIN_BAND_ROWS, mask.band // 4))
    pq_list, pk_list = pq.tolist(), pk.tolist()
    q_sorted = all(x <= y for x, y in zip(pq_list, pq_list[1:]))
    k_sorted = all(x <= y for x, y in zip(pk_list, pk_list[1:]))
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        block = pq_list[r0:r1]
        q_lo, q_hi = (block[0], block[-1]) if q_sorted else (min(block), max(block))
        k0, k1 = 0, lk
        if k_sorted:
            lo, hi = mask.lowest(q_lo), mask.highest(q_hi)
            k0 = 0 if lo is None else bisect.bisect_left(pk_list, lo)
            k1 = lk if hi is None else bisect.bisect_right(pk_list, hi)
        if k1 <= k0:
            continue
        k_lo, k_hi = (pk_list[k0], pk_list[k1 - 1]) if k_sorted else (min(pk_list), max(pk_list))
        if not mask.sees_any(q_lo, q_hi, k_lo, k_hi):
            continue
        vis = None if mask.sees_all(q_lo, q_hi, k_lo, k_hi) else visible(pq[r0:r1], pk[k0:k1], mask)
        yield r0, r1, k0, k1, vis


def _scores(qb, kh, vis, mask: Mask, scale):
    """qb ``[rows, H, D]``, kh ``[H_kv, keys, D]`` -> fp32 scores ``[H_kv, group * rows, keys]``
    (soft-capped, -inf where ``vis`` is False) and the soft-cap derivative (or None)."""
    rows, n_heads, dim = qb.shape
    n_kv = kh.shape[0]
    # [rows, H, D] -> [H_kv, group * rows, D]: row (g, i) is query i of head hk * group + g
    qh = qb.float().view(rows, n_kv, n_heads // n_kv, dim).permute(1, 2, 0, 3).reshape(n_kv, -1, dim)
    s, dcap = cap_scores(torch.bmm(qh, kh.transpose(1, 2)) * scale, mask.softcap)
    if vis is not None:
        s = s.masked_fill(~vis.repeat(n_heads // n_kv, 1), float("-inf"))
    return s, dcap


def _to_rows(x, rows, n_heads):
    """``[H_kv, group * rows, ...]`` -> ``[rows, H, ...]`` (the inverse of the stacking above)."""
    n_kv = x.shape[0]
    return x.view(n_kv, n_heads // n_kv, rows, *x.shape[2:]).permute(2, 0, 1, *range(3, x.dim() + 1)) \
        .reshape(rows, n_heads, *x.shape[2:])


def document_bounds(cu_seqlens_q, cu_seqlens_k, total_q, total_k):
    """``[(q_start, q_end, k_start, k_end)]`` of the documents with queries and keys (the others
    produce nothing: out 0, lse -inf, no gradient)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert len(cq) == len(ck), f"cu_seqlens_q has {len(cq)} entries, cu_seqlens_k {len(ck)}"
    assert cq[-1] <= total_q and ck[-1] <= total_k, f"cu_seqlens end {cq[-1]}/{ck[-1]} past the tokens"
    return [(a, b, c, d) for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]) if b > a and d > c]


def forward_outputs(q, k, v, softmax_scale):
    """``(n_heads, n_kv, scale, out, lse)`` of a forward before any document is computed: rows
    that see no key keep out 0 and lse -inf."""
    n_heads, n_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    assert n_heads % n_kv == 0, f"query heads {n_heads} not a multiple of kv heads {n_kv}"
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    out = q.new_zeros(q.shape[0], n_heads, v.shape[-1])
    lse = torch.full((n_heads, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    return n_heads, n_kv, scale, out, lse


@torch.no_grad()
def blockwise_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None,
                                window_size=(-1, -1), softcap=0.0, chunk_size=None, q_pos=None, k_pos=None):
    """q ``[Tq, H, D]``, k/v ``[Tk, H_kv, D]`` -> ``(out [Tq, H, D] in q's dtype, lse [H, Tq] fp32)``."""
    mask = make_mask(causal, window_size, chunk_size, softcap)
    n_heads, n_kv, scale, out, lse = forward_outputs(q, k, v, softmax_scale)
    for a, b, c, d in document_bounds(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0]):
        kh, vh = k[c:d].float().transpose(0, 1), v[c:d].float().transpose(0, 1)  # [H_kv, Lk, D]
        pq, pk = doc_positions(a, b, c, d, q_pos, k_pos, q.device)
        for r0, r1, k0, k1, vis in _doc_blocks(pq, pk, n_heads, mask):
            s, _ = _scores(q[a + r0:a + r1], kh[:, k0:k1], vis, mask, scale)
            m = torch.logsumexp(s, -1, keepdim=True)  # [H_kv, group * rows, 1]
            p = torch.exp(s - m.nan_to_num(neginf=0.0))
            out[a + r0:a + r1] = _to_rows(torch.bmm(p, vh[:, k0:k1]), r1 - r0, n_heads).to(out.dtype)
            lse[:, a + r0:a + r1] = _to_rows(m, r1 - r0, n_heads)[..., 0].t()
    return out, lse


@torch.no_grad()
def blockwise_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal=False,
                                 softmax_scale=None, window_size=(-1, -1), softcap=0.0, chunk_size=None,
                                 q_pos=None, k_pos=None):
    """Gradients of one attention block given the *final* ``out`` and ``lse`` of its rows (ring
    attention passes the merged ones; sinks are already in ``lse``). Returns dq, dk, dv in the
    input dtypes, dk/dv per kv head."""
    mask = make_mask(causal, window_size, chunk_size, softcap)
    n_heads, head_dim = q.shape[1], q.shape[2]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    delta = (dout.float() * out.float()).sum(-1)  # [Tq, H]
    for a, b, c, d in document_bounds(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0]):
        kh, vh = k[c:d].float().transpose(0, 1), v[c:d].float().transpose(0, 1)  # [H_kv, Lk, D]
        dkh, dvh = torch.zeros_like(kh), torch.zeros_like(vh)
        pq, pk = doc_positions(a, b, c, d, q_pos, k_pos, q.device)
        for r0, r1, k0, k1, vis in _doc_blocks(pq, pk, n_heads, mask):
            rows, n_kv = r1 - r0, kh.shape[0]
            stack = lambda x: x.float().view(rows, n_kv, -1, x.shape[-1]).permute(1, 2, 0, 3) \
                .reshape(n_kv, -1, x.shape[-1])  # noqa: E731  [rows, H, D] -> [H_kv, group * rows, D]
            s, dcap = _scores(q[a + r0:a + r1], kh[:, k0:k1], vis, mask, scale)
            row_lse = stack(lse[:, a + r0:a + r1].t().unsqueeze(-1))  # [H_kv, group * rows, 1]
            p = torch.exp(s - row_lse.nan_to_num(neginf=0.0)).masked_fill(row_lse == float("-inf"), 0.0)
            do = stack(dout[a + r0:a + r1])
            dvh[:, k0:k1] += torch.bmm(p.transpose(1, 2), do)
            ds = p * (torch.bmm(do, vh[:, k0:k1].transpose(1, 2)) - stack(delta[a + r0:a + r1].unsqueeze(-1)))
            if dcap is not None:
                ds = ds * dcap
            dq[a + r0:a + r1] = _to_rows(torch.bmm(ds, kh[:, k0:k1]), rows, n_heads) * scale
            dkh[:, k0:k1] += torch.bmm(ds.transpose(1, 2), stack(q[a + r0:a + r1])) * scale
        dk[c:d], dv[c:d] = dkh.transpose(0, 1), dvh.transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
