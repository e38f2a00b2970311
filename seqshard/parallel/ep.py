"""Expert parallelism (``parallel.ep``): each MoE layer's experts sharded over groups of ``ep`` ranks.

The run's ranks (dp x sp, flattened in mesh order: consecutive ranks share an EP group) are cut
into ``world / ep`` EP groups of ``ep`` consecutive ranks; EP rank ``r`` of every group holds
experts ``[r * E/ep, (r+1) * E/ep)`` (``ExpertShard``; dist/mesh.py ``build_expert_mesh``: dims
``("ep_replica", "ep")``). Ranks with the same EP index in different groups hold the same experts
(replicas): their expert gradients are summed over ``ep_replica``, every other gradient over the
whole world, as without EP (train/engines.py).

A token never leaves its owner for anything but the expert MLP: the router, the aux loss and its
counts (models/moe.py, parallel/moe_stats.py) are computed where the token lives, exactly as
without EP. Per MoE layer forward (``ep_experts``), capacity-free and dropless:

1. the token-expert assignments are sorted by expert (so by owning rank); the per-expert counts
   ``[E]`` are exchanged (``moe.counts``: an all-to-all of ``E/ep`` integers per peer), giving
   each rank how many rows it sends to, and receives from, every peer;
2. the rows go out in one uneven all-to-all (``moe.dispatch``), arriving grouped by source rank
   and, inside each, by local expert;
3. the local experts run on them (``Experts.apply_rows``: the same grouped batched matmuls);
4. the outputs return in the reverse uneven all-to-all (``moe.combine``) and the owner applies
   the router's top-k weights and sums per token.

Both exchanges are ``comm.all_to_all_uneven`` (autograd: backward sends the gradients the other
way, op names ``moe.dispatch.bwd`` / ``moe.combine.bwd``), with a graph anchor, so a rank that
owns no token, or receives none, still takes part in every forward and backward exchange
(DESIGN.md invariant 8). Every rank of an EP group must therefore run the same number of MoE
forwards per step: the trainer pads short replicas with zero-weight micro-batches, as for fsdp2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from seqshard.dist.comm_stats import record

from .comm import all_to_all_uneven


@dataclass
class ExpertShard:
    """Which experts this rank holds, and the groups that exchange tokens / sum gradients."""
    mesh: Any  # DeviceMesh ("ep_replica", "ep")
    num_experts: int  # E, over all EP ranks
    group: Any = field(init=False)  # the EP group: token exchange
    replicas: Any = field(init=False)  # the ranks holding the same experts: gradient sum
    ep: int = field(init=False)
    rank: int = field(init=False)

    def __post_init__(self):
        self.group, self.replicas = self.mesh["ep"].get_group(), self.mesh["ep_replica"].get_group()
        self.ep, self.rank = self.mesh["ep"].size(), self.mesh["ep"].get_local_rank()
        if self.num_experts % self.ep:
            raise ValueError(f"parallel.ep {self.ep} does not divide the expert count {self.num_experts}")

    @property
    def local(self) -> int:
        return self.num_experts // self.ep

    @property
    def first(self) -> int:
        return self.rank * self.local


def ep_experts(experts, x, top_i, top_w):
    """``experts(x, top_i, top_w)`` with ``experts`` holding only this rank's ``E/ep`` experts
    (``experts.ep_shard``); the other experts' rows go to their ranks and back."""
    shard = experts.ep_shard
    ep, local, group = shard.ep, shard.local, shard.group
    k, dim = top_i.shape[1], x.shape[1]
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, hence by rank
    token = order // k
    with torch.no_grad():
        counts = torch.bincount(flat, minlength=shard.num_experts).to(torch.int64)  # [E]: rank j's are j*L..
        received = torch.empty_like(counts)
        with record("moe.counts", counts.numel() * 8 * (ep - 1) // ep):
            dist.all_to_all_single(received, counts, group=group)
        received = received.view(ep, local)  # [source rank, local expert]: rows coming to me
        send = counts.view(ep, local).sum(1).tolist()
        recv = received.sum(1).tolist()
        expert = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(ep),
                                         received.reshape(-1).to(x.device))
    rows = all_to_all_uneven(x[token].reshape(-1), [n * dim for n in send], [n * dim for n in recv], group,
                             "moe.dispatch").view(-1, dim)
    out = experts.apply_rows(rows, expert)
    back = all_to_all_uneven(out.reshape(-1), [n * dim for n in recv], [n * dim for n in send], group,
                             "moe.combine").view(-1, dim)
    weighted = back * top_w.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add(0, token, weighted)


def expert_modules(model):
    """The ``Experts`` modules of a model (anything with ``gate_up`` and ``down`` and ``grouped``)."""
    return [m for m in model.modules() if hasattr(m, "gate_up") and hasattr(m, "down") and hasattr(m, "grouped")]


def shard_experts(model, mesh) -> ExpertShard | None:
    """Keep only this rank's experts in every MoE layer of ``model`` (built whole, the same on
    every rank) and install ``ep_experts``. ``mesh``: dist/mesh.py ``build_expert_mesh``."""
    moes = [m for m in model.modules() if hasattr(m, "expert_fn") and hasattr(m, "experts")]
    if not moes:
        raise ValueError("parallel.ep > 1 needs a model with mixture-of-experts MLPs")
    shard = ExpertShard(mesh, moes[0].experts.gate_up.shape[0])
    lo, hi = shard.first, shard.first + shard.local
    for moe in moes:
        experts = moe.experts
        if experts.gate_up.shape[0] != shard.num_experts:
            raise ValueError("every MoE layer must have the same expert count under expert parallelism")
        experts.gate_up = nn.Parameter(experts.gate_up.detach()[lo:hi].clone())
        experts.down = nn.Parameter(experts.down.detach()[lo:hi].clone())
        experts.ep_shard = shard
        moe.expert_fn = ep_experts
    return shard


def is_expert_param(model) -> dict:
    """``{id(parameter): ExpertShard}`` of the sharded expert parameters of ``model``."""
    return {id(p): m.ep_shard for m in expert_modules(model) if getattr(m, "ep_shard", None) is not None
            for p in (m.gate_up, m.down)}


__all__ = ["ExpertShard", "ep_experts", "shard_experts", "is_expert_param", "expert_modules"]
