"""Torch reference for varlen attention with ``flash_attn_varlen_func`` semantics: the test oracle.

Packed layout: q ``[total_q, H, D]``, k/v ``[total_k, H_kv, D]``; document i of q is
``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` and attends only to document i of k/v.
GQA: query head h reads kv head ``h // (H / H_kv)``. Causal masks are aligned bottom-right
(query j of a length-Lq document sees key positions ``<= j + Lk - Lq``), as in flash-attn >= 2.1.
Sliding windows, soft-capping, chunks and sinks as described in ``masks.py``. Rows that see no
key return 0 with lse ``-inf`` (``sink`` with sinks). The log-sum-exp is fp32 ``[H, total_q]``.
Scores are dense ``[H, Lq, Lk]`` per document: never use this outside tests.
"""
from __future__ import annotations

import torch

from .masks import Mask, cap_scores, doc_positions, make_mask, visible


def _masked_scores(qs, ks, pq, pk, mask: Mask, scale):
    """fp32 ``[H, Lq, Lk]`` scores (soft-capped, -inf where hidden) and the soft-cap derivative."""
    s, dcap = cap_scores(torch.einsum("qhd,khd->hqk", qs.float(), ks.float()) * scale, mask.softcap)
    if mask.causal or mask.banded:
        s = s.masked_fill(~visible(pq, pk, mask), float("-inf"))
    return s, dcap


def attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                        causal=False, softmax_scale=None, return_lse=False, window_size=(-1, -1),
                        softcap=0.0, chunk_size=None, sinks=None, q_pos=None, k_pos=None):
    total_q, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    assert n_heads % n_kv == 0, f"query heads {n_heads} not a multiple of kv heads {n_kv}"
    mask = make_mask(causal, window_size, chunk_size, softcap)
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    group = n_heads // n_kv
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    assert len(cq) == len(ck), f"cu_seqlens_q has {len(cq)} entries, cu_seqlens_k {len(ck)}"
    assert cq[-1] <= total_q and ck[-1] <= k.shape[0], f"cu_seqlens end {cq[-1]}/{ck[-1]} past the tokens"
    # split once: slicing per document would give each slice's backward a full-size zero gradient
    lens_q, lens_k = [b - a for a, b in zip(cq[:-1], cq[1:])], [b - a for a, b in zip(ck[:-1], ck[1:])]
    q_docs = q[cq[0]:cq[-1]].split(lens_q)
    k_docs, v_docs = k[ck[0]:ck[-1]].split(lens_k), v[ck[0]:ck[-1]].split(lens_k)
    outs, lses = [], []
    for i, (qs, ks, vs) in enumerate(zip(q_docs, k_docs, v_docs)):
        lq = qs.shape[0]
        if lq == 0:
            continue
        if group > 1:  # [Lk, Hkv, D] -> [Lk, H, D]
            ks = ks.repeat_interleave(group, dim=1)
            vs = vs.repeat_interleave(group, dim=1)
        pq, pk = doc_positions(cq[i], cq[i + 1], ck[i], ck[i + 1], q_pos, k_pos, q.device)
        s, _ = _masked_scores(qs, ks, pq, pk, mask, scale)  # [H, Lq, Lk]
        if sinks is not None:  # the sink joins the denominator only: [H, Lq, Lk + 1]
            col = sinks.float().view(n_heads, 1, 1).expand(n_heads, lq, 1)
            lse = torch.logsumexp(torch.cat([s, col], -1), dim=-1)
        else:
            lse = torch.logsumexp(s, dim=-1)  # [H, Lq]
        finite = torch.isfinite(lse)
        p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
        p = torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))
        o = torch.einsum("hqk,khd->qhd", p, vs.float())
        outs.append(o.to(q.dtype))
        lses.append(lse)
    if outs:
        out = torch.cat(outs, 0)
        lse = torch.cat(lses, 1)
    else:
        out = q.new_zeros(0, n_heads, v.shape[-1])
        lse = torch.zeros(n_heads, 0, dtype=torch.float32, device=q.device)
    assert out.shape[0] == total_q, f"cu_seqlens_q covers {out.shape[0]} of {total_q} tokens"
    return (out, lse) if return_lse else out


@torch.no_grad()
def attention_forward_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                causal=False, softmax_scale=None, **pattern):
    """No-autograd forward: ``(out, lse)``, the pair ring attention merges block by block."""
    return attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                               softmax_scale=softmax_scale, return_lse=True, **pattern)


@torch.no_grad()
def attention_backward_reference(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                                 max_seqlen_k=None, causal=False, softmax_scale=None, window_size=(-1, -1),
                                 softcap=0.0, chunk_size=None, q_pos=None, k_pos=None):
    """Gradients of one attention block given the *final* ``out`` and ``lse`` of its rows
    (FlashAttention-2's backward: ``dS = P * (dP - rowsum(dO * O))``, times the soft-cap's
    derivative). Returns dq, dk, dv, with dk/dv in the kv-head shape (GQA groups summed). Rows
    with lse -inf contribute nothing. Sinks need nothing here: their share is in ``lse``."""
    mask = make_mask(causal, window_size, chunk_size, softcap)
    n_heads, n_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    group = n_heads // n_kv
    dq, dk, dv = torch.zeros_like(q, dtype=torch.float32), torch.zeros_like(k, dtype=torch.float32), \
        torch.zeros_like(v, dtype=torch.float32)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    delta = (dout.float() * out.float()).sum(-1).t()  # [H, total_q]
    for i in range(len(cq) - 1):
        a, b, c, d = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if a == b or c == d:
            continue
        qs, ks, vs = q[a:b].float(), k[c:d].float(), v[c:d].float()
        if group > 1:
            ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        pq, pk = doc_positions(a, b, c, d, q_pos, k_pos, q.device)
        s, dcap = _masked_scores(qs, ks, pq, pk, mask, scale)
        seg_lse = lse[:, a:b]
        p = torch.exp(s - torch.where(torch.isfinite(seg_lse), seg_lse, torch.zeros_like(seg_lse)).unsqueeze(-1))
        p = torch.where(torch.isfinite(seg_lse).unsqueeze(-1), p, torch.zeros_like(p))
        do = dout[a:b].float()
        dvs = torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, vs)
        ds = p * (dp - delta[:, a:b].unsqueeze(-1))
        if dcap is not None:
            ds = ds * dcap
        dq[a:b] = torch.einsum("hqk,khd->qhd", ds, ks) * scale
        dks = torch.einsum("hqk,qhd->khd", ds, qs) * scale
        if group > 1:  # [Lk, H, D] -> [Lk, H_kv, D]: sum each kv head's query group
            dks = dks.view(d - c, n_kv, group, head_dim).sum(2)
            dvs = dvs.view(d - c, n_kv, group, head_dim).sum(2)
        dk[c:d] += dks
        dv[c:d] += dvs
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
