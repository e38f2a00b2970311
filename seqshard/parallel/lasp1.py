"""LASP-1 (Sun et al., 2024): the sequential ring-of-states baseline of LASP-2.

Each rank waits for the true state at the end of the previous rank, folds in its own pieces and
passes its end state on, one point-to-point hop at a time (P-1 sequential hops); the backward
pass sends state gradients back along the same chain. Same math as ``lasp2.py``; only the
communication differs, which is what the benchmark compares.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqshard.dist.comm_stats import record

from .comm import graph_anchor, keep_in_graph
from .lasp2 import add_incoming, local_pieces, rank_layouts


def _send(t, dst, group, op):
    with record(op, t.numel() * t.element_size()):
        dist.send(t.contiguous(), dist.get_global_rank(group, dst), group=group)


def _recv(like, src, group, op):
    buf = torch.empty_like(like)
    with record(op, 0):
        dist.recv(buf, dist.get_global_rank(group, src), group=group)
    return buf


class _StateChain(torch.autograd.Function):
    """``(S_last, a) -> S_in``: forward passes ``S_end = exp(a) S_in + S_last`` rank to rank;
    backward passes ``dS_end`` back. Every rank takes part in both hops of the chain (the anchor
    puts the node on every rank's graph, see ``comm.py``)."""

    @staticmethod
    def forward(ctx, last_state, last_decay, group, continues, single, _anchor):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        s_in = torch.zeros_like(last_state)
        if rank > 0:
            s_in = _recv(last_state, rank - 1, group, "lasp1.state")
        carry = continues and single
        s_end = last_state + (torch.exp(last_decay).view(-1, 1, 1) * s_in if carry else 0)
        if rank < world - 1:
            _send(s_end, rank + 1, group, "lasp1.state")
        ctx.save_for_backward(s_in, last_decay)
        ctx.group, ctx.carry = group, carry
        return s_in if continues else torch.zeros_like(s_in)

    @staticmethod
    def backward(ctx, d_in):
        s_in, last_decay = ctx.saved_tensors
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        d_end = torch.zeros_like(s_in)
        if rank < world - 1:
            d_end = _recv(s_in, rank + 1, group, "lasp1.state_grad")
        # S_end = exp(a) S_in + S_last (carry) or S_last; S_in reaches this rank's outputs if it continues
        d_last = d_end
        decay = torch.exp(last_decay).view(-1, 1, 1)
        d_decay = (d_end * s_in).sum((1, 2)) * decay.view(-1) if ctx.carry else torch.zeros_like(last_decay)
        d_s_in = d_in + (decay * d_end if ctx.carry else 0)
        if rank > 0:
            _send(d_s_in, rank - 1, group, "lasp1.state_grad")
        return d_last, d_decay, None, None, None, None


def lasp1_attention(q, k, v, g, plan, group):
    """Same contract as :func:`seqshard.parallel.lasp2.lasp2_attention`."""
    layouts = rank_layouts(plan)
    rank = dist.get_rank(group)
    layout = layouts[rank]
    scale = q.shape[-1] ** -0.5
    out, state, decay, first_cum = local_pieces(q, k, v, g, layout, scale)
    s_in = _StateChain.apply(state, decay, group, layout.continues, layout.single, graph_anchor(state))
    if layout.continues:
        return add_incoming(out, q, first_cum, s_in, layout, scale)
    return keep_in_graph(out, s_in)  # the chain's backward hop runs on every rank
