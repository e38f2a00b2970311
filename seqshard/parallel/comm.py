"""Autograd-aware collectives of the SP methods, each with its backward beside it (STYLE rule 7).

Every call is counted by ``seqshard.dist.comm_stats.record`` (bytes this rank sends, seconds),
which also turns a failed or timed-out collective into an error naming the rank and operation.

DESIGN.md invariant 8: a rank must take part in the backward collective of every forward
collective, whatever its shard holds. An ``autograd.Function`` gets a backward node only when
one of its inputs requires grad, and a rank whose shard is all padding may feed a collective
constants (zero states, no real tokens). So every Function here also takes ``graph_anchor()``,
an empty tensor that requires grad whenever autograd is recording: the node exists on every
rank or on none (``torch.no_grad`` is a per-step decision all ranks share). The caller keeps the
output in its result (``keep_in_graph``), so backward reaches the node on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqshard.dist.comm_stats import record


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def graph_anchor(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor that requires grad when autograd records: passed to a collective's
    ``autograd.Function`` so its backward node exists whatever the other inputs are."""
    return torch.empty(0, device=like.device, requires_grad=torch.is_grad_enabled())


def keep_in_graph(out: torch.Tensor, *used: torch.Tensor) -> torch.Tensor:
    """``out`` plus a zero that depends on ``used`` (outputs of collectives this rank does not
    otherwise need), so backward runs their collectives here too. Same value, zero gradient."""
    for t in used:
        if t.requires_grad:
            out = out + 0.0 * t.sum().to(out.dtype)
    return out


def all_to_all(x: torch.Tensor, group, op: str = "all_to_all") -> torch.Tensor:
    """``x`` ``[P, ...]``: chunk j goes to rank j; returns ``[P, ...]`` with chunk i from rank i.
    Sends ``(P-1)/P`` of ``x``; its own backward (the same exchange) undoes it."""
    return _AllToAll.apply(x, group, op, graph_anchor(x))


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, op, _anchor):
        ctx.group, ctx.op = group, op
        return _exchange(x, group, op)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.op + ".bwd"), None, None, None


def _exchange(x, group, op):
    x = x.contiguous()
    out = torch.empty_like(x)
    world = dist.get_world_size(group)
    with record(op, _nbytes(x) * (world - 1) // world):
        dist.all_to_all_single(out, x, group=group)
    return out


def all_to_all_uneven(x: torch.Tensor, in_splits: list[int], out_splits: list[int], group,
                      op: str = "all_to_all_uneven") -> torch.Tensor:
    """1-D ``x``: its ``in_splits[j]`` elements (in order) go to rank j; returns the
    ``out_splits[i]`` elements from each rank i, concatenated. Backward: the reverse exchange."""
    return _AllToAllUneven.apply(x, in_splits, out_splits, group, op, graph_anchor(x))


class _AllToAllUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group, op, _anchor):
        ctx.splits, ctx.group, ctx.op = (in_splits, out_splits), group, op
        return _exchange_uneven(x, in_splits, out_splits, group, op)

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        return _exchange_uneven(grad, out_splits, in_splits, ctx.group, ctx.op + ".bwd"), None, None, None, None, None


def _exchange_uneven(x, in_splits, out_splits, group, op):
    x = x.contiguous()
    out = x.new_empty(sum(out_splits))
    rank = dist.get_rank(group)
    with record(op, (sum(in_splits) - in_splits[rank]) * x.element_size()):
        dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


def all_gather(x: torch.Tensor, group, op: str = "all_gather") -> torch.Tensor:
    """``x`` ``[n, ...]`` -> ``[P, n, ...]`` (rank order); backward reduce-scatters the gradient."""
    return _AllGather.apply(x, group, op, graph_anchor(x))


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, op, _anchor):
        ctx.group, ctx.op = group, op
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        with record(op, _nbytes(x) * (world - 1)):
            dist.all_gather_single(out, x, group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_sum(grad, ctx.group, ctx.op + ".bwd"), None, None, None


def reduce_scatter_sum(x: torch.Tensor, group, op: str = "reduce_scatter") -> torch.Tensor:
    """``x`` ``[P, n, ...]`` -> this rank's ``[n, ...]`` = sum over ranks of ``x[rank]``.
    (gloo has no reduce_scatter: an all-to-all of the chunks and a local sum moves the same bytes.)"""
    world = dist.get_world_size(group)
    received = _exchange(x, group, op)  # [P(source), n, ...]: every rank's chunk for me
    assert received.shape[0] == world, (received.shape, world)
    return received.sum(0)


def ring_exchange(tensor: torch.Tensor, group, op: str = "ring.p2p"):
    """Start sending ``tensor`` to the next rank of the ring and receiving the previous rank's;
    returns ``(received, wait)``; call ``wait()`` before reading ``received``. The transfer runs
    while the caller computes on the current block (batch_isend_irecv)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    tensor = tensor.contiguous()
    if world == 1:  # a ring of one (USP with ulysses == sp): the block comes back to itself
        return tensor, lambda: tensor
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, (rank + 1) % world), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % world), group)]
    requests = dist.batch_isend_irecv(ops)

    def wait():
        with record(op, _nbytes(tensor)):  # time here is the communication not hidden by compute
            for req in requests:
                req.wait()
        return received

    return received, wait


def peer_exchange(sends: dict, recv_shapes: dict, like: torch.Tensor, group, op: str = "p2p"):
    """Point-to-point exchange with chosen peers: ``sends[j]`` goes to group rank j, a tensor of
    ``recv_shapes[i]`` comes from group rank i (both sides derive the pairs from the same plan,
    so every send has its receive). Returns ``(received dict, wait)``; call ``wait()`` before
    reading. Pairs with nothing to move are simply absent: no empty messages."""
    ops, received = [], {}
    for peer, tensor in sends.items():
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), dist.get_global_rank(group, peer), group))
    for peer, shape in recv_shapes.items():
        received[peer] = like.new_empty(shape)
        ops.append(dist.P2POp(dist.irecv, received[peer], dist.get_global_rank(group, peer), group))
    requests = dist.batch_isend_irecv(ops) if ops else []
    nbytes = sum(_nbytes(t) for t in sends.values())

    def wait():
        with record(op, nbytes):
            for req in requests:
                req.wait()
        return received

    return received, wait
