"""Ring attention (Liu et al., 2023) on packed varlen batches, with zigzag causal balancing.

K/V blocks travel around the SP ring; while block j is computed the transfer of block j+1 is
already in flight (``batch_isend_irecv``). Each local query piece attends to the key pieces of
its own document that lie entirely before it (no mask), to itself (causal), and skips the rest,
so fully masked blocks cost nothing. Partial outputs are merged with their log-sum-exp in fp32.
The backward pass recomputes each block from the final output and LSE (FlashAttention-2 style)
while K/V travel around again with their dK/dV accumulators, which arrive home after P hops.
Works for any ShardPlan whose pieces of a document are disjoint, aligned chunks.
Soft-capping and sinks ride along (sinks are added once, after the merge); sliding windows and
chunked attention go to ``ring_window.py``, which computes and sends only the keys a window reaches.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from seqshard.kernels.attention import attention_backward, attention_forward
from seqshard.kernels.attention.masks import apply_sinks, make_mask, sinks_grad

from .comm import graph_anchor, ring_exchange
from .ring_window import merge_block, window_ring_attention


def _ranges(spans, device):
    if not spans:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in spans])


def block_calls(plan, q_rank: int, k_rank: int, causal: bool, device="cpu"):
    """Kernel calls for the queries of ``q_rank`` against the keys of ``k_rank``: a list of
    ``(q_index, k_index, cu_q, cu_k, max_q, max_k, causal)``, at most one unmasked call and one
    diagonal (causal) call; index and ``cu`` tensors on ``device``."""
    by_doc = {}
    for piece, off, n in plan.segments(k_rank):
        if piece.doc >= 0:
            by_doc.setdefault(piece.doc, []).append((piece, off, n))
    full_q, full_k, full_lens, diag = [], [], [], []
    for piece, off, n in plan.segments(q_rank):
        if piece.doc < 0:
            continue  # padding attends to nothing
        visible = []
        for kp, koff, kn in by_doc.get(piece.doc, []):
            if not causal or kp.start + kn <= piece.start:
                visible.append((koff, kn))
            elif kp.start == piece.start and q_rank == k_rank:
                diag.append((off, n))
        if visible:
            full_q.append((off, n))
            full_k += visible
            full_lens.append((n, sum(kn for _, kn in visible)))
    calls = []
    if full_q:
        calls.append(_call(full_q, full_k, [a for a, _ in full_lens], [b for _, b in full_lens], False, device))
    if diag:
        calls.append(_call(diag, diag, [n for _, n in diag], [n for _, n in diag], True, device))
    return calls


def _call(q_spans, k_spans, q_lens, k_lens, causal, device):
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32, device=device)
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum(k_lens)]), dtype=torch.int32, device=device)
    return _ranges(q_spans, device), _ranges(k_spans, device), cu_q, cu_k, max(q_lens), max(k_lens), causal


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan, group, causal, scale, softcap, _anchor):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        calls = [block_calls(plan, rank, (rank - j) % world, causal, q.device) for j in range(world)]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
        kv = torch.stack([k, v])  # [2, T/P, H_kv, D]
        for j in range(world):
            if j < world - 1:
                nxt, wait = ring_exchange(kv, group, "ring.kv")
            for qi, ki, cu_q, cu_k, mq, mk, c in calls[j]:
                o, blse = attention_forward(q[qi], kv[0][ki], kv[1][ki], cu_q, cu_k, mq, mk, c, scale, softcap=softcap)
                merge_block(out, lse, qi, o, blse)
            if j < world - 1:
                kv = wait()
        if sinks is not None:
            out, lse = apply_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.calls, ctx.group, ctx.scale, ctx.softcap = calls, group, scale, softcap
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        group, world = ctx.group, dist.get_world_size(ctx.group)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        for j in range(world):
            for qi, ki, cu_q, cu_k, mq, mk, c in ctx.calls[j]:
                g = attention_backward(dout[qi], q[qi], kv[0][ki], kv[1][ki], out[qi], lse[:, qi],
                                       cu_q, cu_k, mq, mk, c, ctx.scale, softcap=ctx.softcap)
                dq[qi] += g[0].float()
                dkv[0].index_add_(0, ki, g[1].float())
                dkv[1].index_add_(0, ki, g[2].float())
            if j < world - 1:  # K/V and their gradient accumulators move on together
                kv_next, wait_kv = ring_exchange(kv, group, "ring.kv.bwd")
                dkv_next, wait_dkv = ring_exchange(dkv, group, "ring.dkv")
                kv, dkv = wait_kv(), wait_dkv()
            else:  # the last hop brings every block's dK/dV home
                dkv = ring_exchange(dkv, group, "ring.dkv")[1]()
        dsinks = sinks_grad(dout, out, lse, sinks) if sinks is not None else None
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), dsinks, None, None, None, None, None, None


def ring_attention(q, k, v, plan, group, causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                   chunk_size=None, sinks=None):
    """q ``[T/P, H, D]``, k/v ``[T/P, H_kv, D]`` local shards -> output ``[T/P, H, D]``; the
    attention pattern keywords as ``seqshard.kernels.attention`` (``sinks`` ``[H]``)."""
    mask = make_mask(causal, window_size, chunk_size, softcap)
    if mask.banded:
        return window_ring_attention(q, k, v, plan, group, mask, softmax_scale, sinks)
    # the anchor keeps the backward ring on every rank's graph (DESIGN.md invariant 8, comm.py)
    return _RingAttention.apply(q, k, v, sinks, plan, group, causal, softmax_scale, mask.softcap, graph_anchor(q))
