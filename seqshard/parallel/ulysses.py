"""Ulysses sequence parallelism (Jacobs et al., 2023, "DeepSpeed Ulysses").

Each rank holds ``T/P`` tokens of every head. One fused all-to-all (q, k and v packed in one
buffer) gives each rank all ``T`` tokens of ``H/P`` heads; attention runs locally over whole
documents (varlen, per the ShardPlan's padded segments); a second all-to-all returns the output
to the sequence split. GQA: with fewer kv heads than ranks, kv heads are replicated just enough
for each rank to hold the kv head its query heads read. When the head count does not divide the
group size, heads are split unevenly (rank j takes ``H // P`` or one more) with an uneven
all-to-all (``all_to_all_single`` with split sizes); kv heads are then expanded to one per query
head first.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from seqshard.kernels import attention

from .comm import all_to_all, all_to_all_uneven, keep_in_graph


def kv_head_map(n_heads: int, n_kv_heads: int, world: int) -> list[int] | None:
    """kv head each rank needs when ``n_kv_heads < world`` (replication); None if they split."""
    if n_heads % world:
        raise ValueError(f"Ulysses needs the {n_heads} query heads divisible by the SP degree {world}; "
                         "use sp_method ring or usp to go past the head count")
    if n_kv_heads % world == 0:
        return None
    if world % n_kv_heads:
        raise ValueError(f"Ulysses needs {n_kv_heads} kv heads and SP degree {world} to divide one another")
    group = n_heads // n_kv_heads
    return [(j * n_heads // world) // group for j in range(world)]


def _orders(plan, device=None):
    """Rank-major received order <-> padded global order (a permutation of P * local_len), or
    ``(None, None)`` when the two orders are the same (contiguous shards, the stream layout): then
    no token needs moving, and gathering by an identity index would only copy every tensor."""
    rank_major = plan.padded_index.reshape(-1)
    if (rank_major == np.arange(len(rank_major))).all():
        return None, None
    to_padded = np.argsort(rank_major, kind="stable")
    return torch.from_numpy(to_padded).to(device), torch.from_numpy(rank_major).to(device)


def head_counts(n_heads: int, world: int) -> list[int]:
    """Query heads per rank: ``H // P``, the first ``H % P`` ranks one more."""
    return [n_heads // world + (j < n_heads % world) for j in range(world)]


def _scatter_heads_uneven(q, k, v, group):
    """Uneven head split: ``[T/P, H, D]`` -> ``[P * T/P, h_me, D]`` for q, k and v (kv expanded
    to H heads), in one uneven all-to-all."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    local, n_heads, head_dim = q.shape
    rep = n_heads // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [T/P, H, D]
    counts = head_counts(n_heads, world)
    starts = [sum(counts[:j]) for j in range(world)]
    # per destination j: [T/P, 3 * h_j, D] (q, k, v heads of rank j side by side), flattened
    send = torch.cat([torch.cat([x[:, a:a + n] for x in (q, k, v)], dim=1).reshape(-1)
                      for a, n in zip(starts, counts)])
    mine = counts[me]
    received = all_to_all_uneven(send, [local * 3 * n * head_dim for n in counts],
                                 [local * 3 * mine * head_dim] * world, group, "ulysses.qkv")
    full = received.reshape(world * local, 3 * mine, head_dim)  # [P(src) * T/P, 3 h_me, D]
    return full.split([mine, mine, mine], dim=1)


def _gather_heads_uneven(out, group, n_heads: int):
    """``[P * T/P, h_me, D]`` (rank-major tokens) -> ``[T/P, H, D]`` with an uneven all-to-all."""
    world = dist.get_world_size(group)
    total, mine, head_dim = out.shape
    local = total // world
    counts = head_counts(n_heads, world)
    back = all_to_all_uneven(out.reshape(-1), [local * mine * head_dim] * world,
                             [local * n * head_dim for n in counts], group, "ulysses.out")
    pieces = back.split([local * n * head_dim for n in counts])  # from rank j: [T/P, h_j, D]
    return torch.cat([p.reshape(local, n, head_dim) for p, n in zip(pieces, counts)], dim=1)


def scatter_heads(q, k, v, group):
    """Sequence split -> head split: ``[T/P, H, D]`` -> ``[P * T/P, H/P, D]`` in rank-major
    order (rank i's tokens i-th), q, k and v in ONE all-to-all."""
    world = dist.get_world_size(group)
    local, n_heads, head_dim = q.shape
    kv_map = kv_head_map(n_heads, k.shape[1], world)
    if kv_map is not None:  # [T/P, H_kv, D] -> [T/P, P, D]: one replicated kv head per rank
        k, v = k[:, kv_map], v[:, kv_map]
    hq, hk = n_heads // world, k.shape[1] // world
    # [T/P, H, D] -> [P, T/P, H/P, D] per tensor; q, k, v side by side per destination rank,
    # written by cat straight into the send layout (one copy)
    packed = torch.cat([x.reshape(local, world, x.shape[1] // world, head_dim).transpose(0, 1) for x in (q, k, v)],
                       dim=2)
    received = all_to_all(packed, group, "ulysses.qkv")  # [P(src), T/P, hq+2hk, D]
    full = received.reshape(world * local, hq + 2 * hk, head_dim)
    return full.split([hq, hk, hk], dim=1)


def gather_heads(out, group):
    """Head split -> sequence split: ``[P * T/P, H/P, D]`` (rank-major) -> ``[T/P, H, D]``."""
    world = dist.get_world_size(group)
    total, hq, head_dim = out.shape
    local = total // world
    back = all_to_all(out.reshape(world, local, hq, head_dim), group, "ulysses.out")  # [P(heads), T/P, H/P, D]
    return back.transpose(0, 1).reshape(local, world * hq, head_dim)


def local_heads(n_heads: int, world: int, rank: int) -> slice:
    """The query heads rank ``rank`` holds after the all-to-all (even or uneven split)."""
    counts = head_counts(n_heads, world)
    return slice(sum(counts[:rank]), sum(counts[:rank + 1]))


def ulysses_attention(q, k, v, plan, group, causal=True, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                      chunk_size=None, sinks=None):
    """q ``[T/P, H, D]``, k/v ``[T/P, H_kv, D]`` local shards -> output ``[T/P, H, D]``. Every rank
    sees whole documents, so windows, chunks and soft-caps pass straight to the kernel; sinks
    ``[H]`` are cut to the rank's heads."""
    world = dist.get_world_size(group)
    if world > q.shape[1]:
        raise ValueError(f"Ulysses over {world} ranks needs at least {world} query heads, got {q.shape[1]}; "
                         "use sp_method ring or usp to go past the head count")
    uneven = q.shape[1] % world != 0
    qf, kf, vf = _scatter_heads_uneven(q, k, v, group) if uneven else scatter_heads(q, k, v, group)
    to_padded, to_rank_major = _orders(plan, q.device)
    if to_padded is not None:
        qf, kf, vf = qf[to_padded], kf[to_padded], vf[to_padded]  # padded global order
    cu = torch.tensor(plan.padded_cu_seqlens(), dtype=torch.int32, device=q.device)
    max_len = int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
    if sinks is not None:
        sinks = sinks[local_heads(q.shape[1], world, dist.get_rank(group))]
    out = attention(qf, kf, vf, cu, cu, max_len, max_len, causal=causal, softmax_scale=softmax_scale,
                    window_size=window_size, softcap=softcap, chunk_size=chunk_size, sinks=sinks)
    out = keep_in_graph(out, qf)  # backward reaches the first all-to-all on every rank
    if to_rank_major is not None:
        out = out[to_rank_major]
    if uneven:
        return _gather_heads_uneven(out, group, q.shape[1])
    return gather_heads(out, group)
