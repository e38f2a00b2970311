"""LASP-2 (Sun et al., 2025): linear-attention sequence parallelism with one AllGather of
fixed-size memory states per layer, whatever the sequence length.

On the ``stream`` layout each rank holds a contiguous range of the packed stream. Every local
piece of a document is computed from a zero state (intra part); the state after the rank's last
piece, ``S_last`` ``[H, K, V]``, and that piece's total log decay ``a`` ``[H]`` are all-gathered
(one collective). The true state entering this rank's first piece, when its document started on
an earlier rank, is the prefix combination ``S_in(r) = exp(a_{r-1}) S_in(r-1) + S_last_{r-1}``
over the ranks that document spans; its contribution ``scale * q_t exp(G_t) S_in`` is added to
the first piece (inter part). Backward: the all-gather's backward reduce-scatters the state
gradients (one collective). Documents starting inside a rank start from zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqshard.kernels.linear_attention import linear_attention

from .comm import all_gather, keep_in_graph


@dataclass(frozen=True)
class RankLayout:
    """How the documents of one rank's range relate to its neighbours (pure, from the plan)."""
    pieces: list  # (doc, local_offset, length) of real tokens, in order
    continues: bool  # the first piece continues a document from the previous rank
    single: bool  # the rank holds one piece only (so its end state carries the incoming one)


def rank_layouts(plan) -> list[RankLayout]:
    layouts = []
    for r in range(plan.world):
        pieces = [(p.doc, off, n) for p, off, n in plan.segments(r) if p.doc >= 0]
        first = next((p for p, _, _ in plan.segments(r) if p.doc >= 0), None)
        layouts.append(RankLayout(pieces, bool(first and first.start > 0), len(pieces) == 1))
    return layouts


def local_pieces(q, k, v, g, layout: RankLayout, scale):
    """Each piece from a zero state, all in one varlen ``linear_attention`` call (padding runs are
    segments of their own whose output is zeroed). Returns the output ``[T/P, H, V]`` (padding
    rows zero), the fp32 state after the last piece ``[H, K, V]`` and the last piece's total log
    decay ``[H]``, and the first piece's cumulative decay ``[n, H]`` (for the inter-rank term).
    The kernel runs on every shard, one of padding only too, so q, k, v, g always get a gradient."""
    t, h, dk, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    bounds = sorted({0, t} | {off for _, off, _ in layout.pieces} | {off + n for _, off, n in layout.pieces})
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    real = torch.zeros(t, dtype=torch.bool, device=q.device)
    for _, off, n in layout.pieces:
        real[off:off + n] = True
    o, states = linear_attention(q[None], k[None], v[None], None if g is None else g[None], scale,
                                 output_final_state=True, cu_seqlens=cu)
    out = o[0] * real[:, None, None].to(o.dtype)
    if not layout.pieces:  # padding only: nothing flows to the next rank
        return out, q.new_zeros(h, dk, dv, dtype=torch.float32), q.new_zeros(h, dtype=torch.float32), None
    (_, first_off, first_n), (_, last_off, last_n) = layout.pieces[0], layout.pieces[-1]
    last_state = states[bounds.index(last_off)]
    if g is None:
        return out, last_state, q.new_zeros(h, dtype=torch.float32), torch.zeros(first_n, h, device=q.device)
    return out, last_state, g[last_off:last_off + last_n].float().sum(0), g[first_off:first_off + first_n].cumsum(0)


def incoming_state(states, decays, layouts, rank):
    """Prefix combination over the ranks the first document spans (differentiable)."""
    if not layouts[rank].continues:
        return None
    s_in, j = None, rank - 1
    chain = []
    while j >= 0:
        chain.append(j)
        if not (layouts[j].single and layouts[j].continues):
            break
        j -= 1
    for j in reversed(chain):  # S_end(j) = exp(a_j) S_in(j) + S_last(j) along the chain
        carried = 0 if s_in is None else s_in * torch.exp(decays[j]).view(-1, 1, 1)
        s_in = states[j] + carried
    return s_in


def add_incoming(out, q, first_cum, s_in, layout, scale):
    """Inter-rank term of the first piece: ``scale * q_t exp(G_t) S_in``."""
    _, off, n = layout.pieces[0]
    qs = q[off:off + n].float() * torch.exp(first_cum).unsqueeze(-1)  # [n, H, K]
    extra = scale * torch.einsum("thk,hkv->thv", qs, s_in.float()).to(out.dtype)
    return out.index_add(0, torch.arange(off, off + n, device=out.device), extra)


def lasp2_attention(q, k, v, g, plan, group):
    """q, k ``[T/P, H, K]``, v ``[T/P, H, V]``, g ``[T/P, H]`` or None, on the stream layout."""
    layouts = rank_layouts(plan)
    rank = dist.get_rank(group)
    scale = q.shape[-1] ** -0.5
    out, state, decay, first_cum = local_pieces(q, k, v, g, layouts[rank], scale)
    h, dk, dv = state.shape
    packed = torch.cat([state.reshape(-1), decay.reshape(-1)])  # one fp32 buffer on every rank: [H K V + H]
    gathered = all_gather(packed, group, "lasp2.states")  # [P, H K V + H]
    states = gathered[:, :h * dk * dv].reshape(-1, h, dk, dv)
    decays = gathered[:, h * dk * dv:]
    s_in = incoming_state(states, decays, layouts, rank)
    if s_in is not None:
        return add_incoming(out, q, first_cum, s_in, layouts[rank], scale)
    # the all-gather's backward is a collective: it must run here too (DESIGN.md invariant 8)
    return keep_in_graph(out, gathered)
