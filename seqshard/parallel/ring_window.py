"""Ring attention for banded masks (sliding windows, chunked attention): only the keys a window
can reach are computed *and sent*.

With a window of W tokens a query sees at most W keys, so the full ring (every K/V block around
every rank) moves and computes far more than needed. Here each rank works out from the
ShardPlan alone (a pure function every rank evaluates identically) which of its keys every other
rank's queries can see; at distance j (rank r sends to r + j, receives from r - j, as the ring's
j-th hop would) it sends exactly those keys, nothing to a rank that needs none. The local block
is computed while the transfers run. The backward keeps the received keys and sends their dK/dV
home the reverse way. Bytes per rank are the analytic minimum: the keys of other ranks inside
the window of this rank's queries. Partial outputs merge by their lse in fp32; sinks are added
once after the merge.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from seqshard.kernels.attention import attention_backward, attention_forward
from seqshard.kernels.attention.masks import Mask, apply_sinks, sinks_grad

from .comm import graph_anchor, peer_exchange


def _doc_segments(plan, rank):
    by_doc = {}
    for piece, off, n in plan.segments(rank):
        if piece.doc >= 0:
            by_doc.setdefault(piece.doc, []).append((piece, off, n))
    return by_doc


def banded_call(plan, q_rank: int, k_rank: int, mask: Mask):
    """The keys of ``k_rank`` that queries of ``q_rank`` can see, and the kernel call over them:
    ``(needed, call)`` with ``needed`` sorted local key offsets of ``k_rank`` (numpy) and
    ``call = (q_index, k_index_into_needed, cu_q, cu_k, q_pos, k_pos)`` or None."""
    keys = _doc_segments(plan, k_rank)
    q_idx, k_idx, q_pos, k_pos, q_lens, k_lens = [], [], [], [], [], []
    for piece, off, n in plan.segments(q_rank):
        if piece.doc < 0:
            continue  # padding attends to nothing
        qs, qe = piece.start, piece.start + n - 1
        lo_bound, hi_bound = mask.lowest(qs), mask.highest(qe)
        seen_off, seen_pos = [], []
        for kp, koff, kn in keys.get(piece.doc, []):
            lo = kp.start if lo_bound is None else max(kp.start, lo_bound)
            hi = kp.start + kn - 1 if hi_bound is None else min(kp.start + kn - 1, hi_bound)
            if lo > hi or not mask.sees_any(qs, qe, lo, hi):
                continue
            seen_off.append(np.arange(koff + lo - kp.start, koff + hi - kp.start + 1))
            seen_pos.append(np.arange(lo, hi + 1))
        if seen_off:
            q_idx.append(np.arange(off, off + n))
            q_pos.append(np.arange(qs, qe + 1))
            k_idx += seen_off
            k_pos += seen_pos
            q_lens.append(n)
            k_lens.append(sum(len(x) for x in seen_off))
    if not q_idx:
        return np.zeros(0, np.int64), None
    k_all = np.concatenate(k_idx)
    needed = np.unique(k_all)
    t = lambda x, dt=torch.long: torch.from_numpy(np.ascontiguousarray(x)).to(dt)  # noqa: E731
    cu = lambda lens: t(np.concatenate([[0], np.cumsum(lens)]), torch.int32)  # noqa: E731
    call = (t(np.concatenate(q_idx)), t(np.searchsorted(needed, k_all)), cu(q_lens), cu(k_lens),
            t(np.concatenate(q_pos)), t(np.concatenate(k_pos)))
    return needed, call


def exchange_plan(plan, rank: int, world: int, mask: Mask):
    """``(calls, send_idx, recv_len)``: per distance j, this rank's call on the keys from
    ``rank - j``, the local key offsets it sends to ``rank + j``, and how many keys it receives."""
    calls, send_idx, recv_len = [], [], []
    for j in range(world):
        src, dst = (rank - j) % world, (rank + j) % world
        needed, call = banded_call(plan, rank, src, mask)
        calls.append(call)
        recv_len.append(len(needed))
        send_idx.append(torch.from_numpy(banded_call(plan, dst, rank, mask)[0]))
    return calls, send_idx, recv_len


def window_bytes_minimum(plan, rank: int, mask: Mask, bytes_per_token: int) -> int:
    """Analytic minimum of K/V bytes this rank must send in the forward: each of its keys once to
    every other rank whose queries' window or chunk reaches it."""
    world = plan.world
    return sum(len(banded_call(plan, (rank + j) % world, rank, mask)[0]) for j in range(1, world)) * bytes_per_token


class _WindowRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan, group, mask, scale, _anchor):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        calls, send_idx, recv_len = exchange_plan(plan, rank, world, mask)
        dev = q.device
        kv = torch.stack([k, v])  # [2, T/P, H_kv, D]
        sends = {(rank + j) % world: kv[:, send_idx[j].to(dev)] for j in range(1, world) if len(send_idx[j])}
        shapes = {(rank - j) % world: (2, recv_len[j], *k.shape[1:]) for j in range(1, world) if recv_len[j]}
        received, wait = peer_exchange(sends, shapes, kv, group, "ring_window.kv")
        out = torch.zeros(q.shape, dtype=torch.float32, device=dev)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=dev)
        pattern = dict(window_size=(mask.left, mask.right), softcap=mask.softcap, chunk_size=mask.chunk or None)
        own = torch.from_numpy(banded_call(plan, rank, rank, mask)[0]).to(dev)  # own keys some query sees
        blocks = [kv[:, own]]
        _block(out, lse, q, blocks[0], calls[0], mask.causal, scale, pattern)
        received = wait()
        for j in range(1, world):
            blocks.append(received.get((rank - j) % world))
            _block(out, lse, q, blocks[j], calls[j], mask.causal, scale, pattern)
        if sinks is not None:
            out, lse = apply_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.blocks, ctx.calls, ctx.send_idx, ctx.group, ctx.own = blocks, calls, send_idx, group, own
        ctx.args = (mask.causal, scale, pattern)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        causal, scale, pattern = ctx.args
        dev = q.device
        dq = torch.zeros(q.shape, dtype=torch.float32, device=dev)
        dkv_home, sends = {}, {}
        for j, (block, call) in enumerate(zip(ctx.blocks, ctx.calls)):
            if call is None:
                continue
            qi, ki, cu_q, cu_k, q_pos, k_pos = (t.to(dev) for t in call)
            g = attention_backward(dout[qi], q[qi], block[0][ki], block[1][ki], out[qi], lse[:, qi], cu_q, cu_k,
                                   None, None, causal, scale, q_pos=q_pos, k_pos=k_pos, **pattern)
            dq[qi] += g[0].float()
            dblock = torch.zeros(block.shape, dtype=torch.float32, device=dev)
            dblock[0].index_add_(0, ki, g[1].float())
            dblock[1].index_add_(0, ki, g[2].float())
            if j == 0:
                dkv_home[0] = dblock
            else:
                sends[(rank - j) % world] = dblock
        shapes = {(rank + j) % world: (2, len(ctx.send_idx[j]), *k.shape[1:]) for j in range(1, world)
                  if len(ctx.send_idx[j])}
        got, wait = peer_exchange(sends, shapes, dq, group, "ring_window.dkv")
        dkv = torch.zeros((2, *k.shape), dtype=torch.float32, device=dev)
        if 0 in dkv_home:
            dkv.index_add_(1, ctx.own, dkv_home[0])
        got = wait()
        for j in range(1, world):
            peer = (rank + j) % world
            if peer in got:
                dkv.index_add_(1, ctx.send_idx[j].to(dev), got[peer])
        dsinks = sinks_grad(dout, out, lse, sinks) if sinks is not None else None
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), dsinks, None, None, None, None, None


def _block(out, lse, q, block, call, causal, scale, pattern):
    """Fold one key block's attention into the fp32 accumulators (rows of ``call``)."""
    if call is None:
        return
    qi, ki, cu_q, cu_k, q_pos, k_pos = (t.to(q.device) for t in call)
    o, blse = attention_forward(q[qi], block[0][ki], block[1][ki], cu_q, cu_k, None, None, causal, scale,
                                q_pos=q_pos, k_pos=k_pos, **pattern)
    merge_block(out, lse, qi, o, blse)


def merge_block(out, lse, idx, o, block_lse):
    """Fold a block's (o, lse) into the running fp32 accumulators of rows ``idx``."""
    old = lse[:, idx]
    new = torch.logaddexp(old, block_lse)
    w_old = torch.exp(old - new).nan_to_num(0.0).t().unsqueeze(-1)  # [rows, H, 1]
    w_new = torch.exp(block_lse - new).nan_to_num(0.0).t().unsqueeze(-1)
    out[idx] = out[idx] * w_old + o.float() * w_new
    lse[:, idx] = new


def window_ring_attention(q, k, v, plan, group, mask: Mask, softmax_scale=None, sinks=None):
    """q ``[T/P, H, D]``, k/v ``[T/P, H_kv, D]`` local shards, a banded ``mask`` -> ``[T/P, H, D]``."""
    return _WindowRing.apply(q, k, v, sinks, plan, group, mask, softmax_scale, graph_anchor(q))
