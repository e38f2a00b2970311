"""All-gather KV context parallelism (the Llama 3 style; Dubey et al., 2024, section 3.3.2).

K and V of the whole group are all-gathered; each rank's queries attend to the keys of their
own document up to their position (or to the whole document when not causal). The backward of
the all-gather reduce-scatters dK and dV. Simple, exact on any layout, and communication is
``(P-1)/P`` of the K/V activations per rank.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from seqshard.kernels import attention

from seqshard.kernels.attention.masks import Mask, make_mask

from .comm import all_gather, keep_in_graph
from .ulysses import _orders


def key_segments(plan, rank: int, causal: bool):
    """For every local segment: the keys it attends to, as padded-global ranges."""
    starts = plan.padded_doc_starts()
    q_lens, k_ranges = [], []
    for piece, _, n in plan.segments(rank):
        q_lens.append(n)
        if piece.doc < 0 or piece.doc >= len(starts):  # padding attends to nothing
            k_ranges.append((0, 0))
            continue
        end = piece.start + n if causal else piece.real
        k_ranges.append((starts[piece.doc], starts[piece.doc] + end))
    return q_lens, k_ranges


def window_key_segments(plan, rank: int, mask: Mask):
    """Like ``key_segments`` for a windowed / chunked / soft-capped mask: the keys within reach of
    each local segment, and the queries' and keys' positions in their document."""
    starts = plan.padded_doc_starts()
    q_lens, k_ranges, q_pos, k_pos = [], [], [], []
    for piece, _, n in plan.segments(rank):
        q_lens.append(n)
        q_pos.append(np.arange(piece.start, piece.start + n))
        lo, hi = 0, -1
        if 0 <= piece.doc < len(starts):
            lo_b, hi_b = mask.lowest(piece.start), mask.highest(piece.start + n - 1)
            lo = 0 if lo_b is None else max(0, lo_b)
            hi = piece.real - 1 if hi_b is None else min(piece.real - 1, hi_b)
        if lo > hi:  # padding, or nothing in reach
            k_ranges.append((0, 0))
            continue
        k_ranges.append((starts[piece.doc] + lo, starts[piece.doc] + hi + 1))
        k_pos.append(np.arange(lo, hi + 1))
    cat = lambda xs: torch.from_numpy(np.concatenate(xs) if xs else np.zeros(0, np.int64))  # noqa: E731
    return q_lens, k_ranges, cat(q_pos), cat(k_pos)


def allgather_attention(q, k, v, plan, group, causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                        chunk_size=None, sinks=None):
    """q ``[T/P, H, D]``, k/v ``[T/P, H_kv, D]`` local shards -> output ``[T/P, H, D]``. With a
    window or chunk, each segment reads only the gathered keys within its reach."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mask = make_mask(causal, window_size, chunk_size, softcap)
    n_kv = k.shape[1]
    gathered = all_gather(torch.cat([k, v], dim=1), group, "allgather.kv")  # [P, T/P, 2 H_kv, D]
    to_padded, _ = _orders(plan, q.device)
    kv = gathered.reshape(-1, 2 * n_kv, k.shape[2])
    if to_padded is not None:
        kv = kv[to_padded]  # padded global order
    dev = q.device
    positions = {}
    if mask.plain:
        q_lens, k_ranges = key_segments(plan, rank, causal)
    else:
        q_lens, k_ranges, q_pos, k_pos = window_key_segments(plan, rank, mask)
        positions = dict(q_pos=q_pos.to(dev), k_pos=k_pos.to(dev))
    kidx = torch.cat([torch.arange(a, b, device=dev) for a, b in k_ranges]) if k_ranges \
        else torch.zeros(0, dtype=torch.long, device=dev)
    kv_seg = kv[kidx]
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(q_lens, dtype=np.int64)]), dtype=torch.int32, device=dev)
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum([b - a for a, b in k_ranges], dtype=np.int64)]),
                        dtype=torch.int32, device=dev)
    out = attention(q, kv_seg[:, :n_kv], kv_seg[:, n_kv:], cu_q, cu_k, max(q_lens, default=0),
                    int((cu_k[1:] - cu_k[:-1]).max()) if len(k_ranges) else 0, causal=causal,
                    softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, chunk_size=chunk_size,
                    sinks=sinks, **positions)
    # a shard of padding reads no gathered key: the all-gather's backward must still run here
    return keep_in_graph(out, gathered)
