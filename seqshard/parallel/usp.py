"""USP: unified sequence parallelism (Fang & Zhao, 2024), the SP group as ``ulysses x ring``.

SP rank = ring index * U + ulysses index, so each Ulysses group is U consecutive ranks (the
fast links of a node). An all-to-all inside the Ulysses group gives every rank the tokens of
its U group members for H/U heads; Ring attention then runs across the R = P/U Ulysses groups
on those merged shards; a second all-to-all restores the sequence split. The head count caps
only U, not the SP degree.
"""
from __future__ import annotations

import numpy as np
import torch.distributed as dist

from .plan import ShardPlan
from .ring import ring_attention
from .ulysses import gather_heads, local_heads, scatter_heads


def ring_plan(plan: ShardPlan, ulysses: int) -> ShardPlan:
    """The plan as seen by the ring: ring rank i holds the pieces of SP ranks iU .. iU+U-1."""
    ring = plan.world // ulysses
    groups = [range(i * ulysses, (i + 1) * ulysses) for i in range(ring)]
    return ShardPlan(plan.cu_seqlens, ring, plan.layout,
                     [[p for r in g for p in plan.pieces[r]] for g in groups],
                     np.stack([np.concatenate([plan.index[r] for r in g]) for g in groups]),
                     np.stack([np.concatenate([plan.padded_index[r] for r in g]) for g in groups]))


def usp_attention(q, k, v, plan, groups, causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                  chunk_size=None, sinks=None):
    """q ``[T/P, H, D]``, k/v ``[T/P, H_kv, D]`` local shards; ``groups = (ulysses, ring)``. The
    attention pattern goes to the ring (windows and chunks to its window-aware exchange); sinks
    ``[H]`` are cut to the Ulysses rank's heads."""
    ulysses_group, ring_group = groups
    u = dist.get_world_size(ulysses_group)
    qf, kf, vf = scatter_heads(q, k, v, ulysses_group)  # [U * T/P, H/U, D]
    if sinks is not None:
        sinks = sinks[local_heads(q.shape[1], u, dist.get_rank(ulysses_group))]
    out = ring_attention(qf, kf, vf, ring_plan(plan, u), ring_group, causal=causal, softmax_scale=softmax_scale,
                         window_size=window_size, softcap=softcap, chunk_size=chunk_size, sinks=sinks)
    return gather_heads(out, ulysses_group)
