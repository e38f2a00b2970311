"""Runtime of heterogeneity-adaptive scattering (FlexSP-style): regroup the ranks every step.

Every rank holds a full replica. Group sizes need not be powers of two (3, 6, 12, ...; FCP-style
arbitrary degrees) and groups need not be aligned: a plan's groups are contiguous rank ranges.
Each step, rank 0 plans from the step's document lengths
(:func:`seqshard.parallel.phases.plan_phased`: one phase of groups, or the long documents' groups
then the rest, one after the other) and broadcasts the plan; every rank then creates
the process groups of that plan it has not seen yet, in plan order (``dist.new_group`` is
collective, and the broadcast plan is the same everywhere), keeps them for later steps, finds
the group it belongs to, packs that group's
documents into one varlen stream, shards it over the group with a ShardPlan and runs the SP
method the plan chose for that group (``plan.methods``: Ulysses, Ring, or USP for groups past the
head count; a group of one runs plain local attention). Gradients are then summed over all
ranks, so the loss trajectory is the single-process one whatever the plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from seqshard.dist.comm_stats import record
from seqshard.dist.guard import shared_failure
from seqshard.models.context import VarlenContext, causal_varlen_attention

from .parallelize import DEFAULT_LAYOUT, SPContext
from .planner import allowed_group_sizes


@dataclass
class AdaptiveContext(SPContext):
    method: str = "ulysses"  # ulysses | ring | usp: what this step's group runs


def ensure_groups(groups: dict, ranges) -> dict:
    """Adds a process group for every ``(first, size)`` range not in ``groups`` (``None`` for
    size 1), in the order given. Collective: every rank must call it with the same ranges."""
    for first, size in ranges:
        if (first, size) not in groups:
            groups[(first, size)] = dist.new_group(list(range(first, first + size))) if size > 1 else None
    return groups


def usp_groups_for(first: int, size: int, n_heads: int) -> tuple:
    """(ulysses group, ring group) of this rank inside ``first .. first+size-1``: U = gcd(heads,
    size) consecutive ranks form a Ulysses group, ranks with the same Ulysses index form a ring
    (SP rank = ring index * U + ulysses index, as in usp.py). Collective over all ranks."""
    rank, u = dist.get_rank(), math.gcd(n_heads, size)
    mine = [None, None]
    for i in range(size // u):
        ranks = list(range(first + i * u, first + (i + 1) * u))
        g = dist.new_group(ranks)
        mine[0] = g if rank in ranks else mine[0]
    for j in range(u):
        ranks = list(range(first + j, first + size, u))
        g = dist.new_group(ranks)
        mine[1] = g if rank in ranks else mine[1]
    return tuple(mine)


@dataclass
class GroupWork:
    """What this rank does in one step: its group and the documents assigned to that group."""
    first: int
    size: int
    doc_ids: list[int]


def my_work(plan, doc_lengths, rank: int) -> GroupWork:
    for g, (first, size) in enumerate(plan.groups):
        if first <= rank < first + size:
            return GroupWork(first, size, [i for i, a in enumerate(plan.assignment) if a == g])
    raise AssertionError(f"rank {rank} is in no group of {plan.groups}")


def adaptive_attention(q, k, v, ctx, **pattern):
    """Installed on every softmax layer: the group's method (``ctx.method``), local for groups of one;
    the layer's attention ``pattern`` (window, soft-cap, chunk, sinks) goes to whichever runs."""
    if isinstance(ctx, VarlenContext):
        return causal_varlen_attention(q, k, v, ctx, **pattern)
    if ctx.method == "ring":
        from .ring import ring_attention

        return ring_attention(q, k, v, ctx.plan, ctx.group, causal=True, **pattern)
    if ctx.method == "usp":
        from .usp import usp_attention

        return usp_attention(q, k, v, ctx.plan, (ctx.ulysses_group, ctx.ring_group), causal=True, **pattern)
    from .ulysses import ulysses_attention

    return ulysses_attention(q, k, v, ctx.plan, ctx.group, causal=True, **pattern)


def install_adaptive(model, cfg=None) -> None:
    """Every softmax layer gets :func:`adaptive_attention`; native layers also the copy-free
    Ulysses layer of ``cfg`` (spec.parallel), which runs a step's Ulysses and USP groups and hands
    the other steps to ``adaptive_attention``."""
    from .parallelize import fused_layer

    layer_fn = fused_layer(cfg) if cfg is not None else None
    for module in model.modules():
        if hasattr(module, "attention_fn"):
            module.attention_fn = adaptive_attention
            if hasattr(module, "sp_layer_fn"):
                module.sp_layer_fn = layer_fn


def split_documents(rows):
    """The step's rows -> per-document (tokens, labels, positions, sources) tuples, in row order
    (``sources``: each token's source index, or None when the row carries none)."""
    docs = []
    for row in rows:
        bounds = [0, *torch.tensor(row.doc_lens).cumsum(0).tolist()]
        src = row.sources
        docs += [(row.tokens[a:b], row.labels[a:b], row.positions[a:b], None if src is None else src[a:b])
                 for a, b in zip(bounds[:-1], bounds[1:])]
    return docs


def pack_group(doc_ids, lengths, budget):
    """A group's documents into micro-batches of at most ``budget`` tokens, best-fit decreasing
    (fewer micro-batches than packing them in order: each micro-batch has a fixed cost). The
    planner never gives a group a document longer than ``budget``."""
    from .packing import pack

    ids = list(doc_ids)
    return [[ids[j] for j in b] for b in pack([lengths[i] for i in ids], budget, "bfd")] if ids else []


def planner_memory_tokens(spec, world_size: int) -> int:
    """Tokens of one sequence a device holds: ``parallel.planner.memory_tokens`` when set, else the
    memory model's longest fitting sequence at sp 1 when ``train.device_memory_gb`` is set, else
    ``data.max_seq_len``."""
    if spec.parallel.planner.memory_tokens:
        return spec.parallel.planner.memory_tokens
    if spec.train.device_memory_gb:
        from . import memory_model as mm

        c = replace(mm.config_from_spec(spec, world_size, "cuda" if torch.cuda.is_available() else "cpu"),
                    sp=1, sp_method="none")
        return max(1, mm.longest_fitting(spec.model, c, spec.train.device_memory_gb * 2**30))
    return spec.data.max_seq_len


class AdaptiveScatter:
    """Each step: plan groups for the step's documents, then yield this rank's micro-batches."""

    def __init__(self, model, spec, world_size: int, rank: int, pad_id: int):
        from .cost_model import CostModel
        from .hardware import get_profile

        p = spec.parallel
        self.world, self.rank, self.pad_id = world_size, rank, pad_id
        self.max_sp, self.solver, self.time_limit = p.max_sp, p.planner.solver, p.planner.time_limit_s
        self.max_phases = p.planner.max_phases
        self.memory_tokens = planner_memory_tokens(spec, world_size)
        self.sizes = allowed_group_sizes(world_size, p.max_sp, spec.model.n_heads)
        self.groups = {}  # (first, size) -> ProcessGroup, created when a plan first uses them
        bytes_per_element = 2 if spec.train.dtype == "bfloat16" else 4
        cost_model = CostModel.from_model_config(spec.model, get_profile(p.planner.profile), bytes_per_element)
        self.cost_model = replace(cost_model, pack_tokens=self.memory_tokens)  # d x memory_tokens per micro-batch
        self.usp_groups = {}
        self.last = {}
        install_adaptive(model, p)

    def plan(self, lengths):
        """Rank 0 plans (a timed MILP may differ between ranks) and broadcasts the plan."""
        from .phases import plan_phased

        box = [None]
        with shared_failure("adaptive plan"):  # a plan error on rank 0 reaches every rank
            if self.rank == 0:
                box[0] = plan_phased(lengths, self.world, max_phases=self.max_phases, max_sp=self.max_sp,
                                     memory_tokens=self.memory_tokens, cost_model=self.cost_model,
                                     solver=self.solver, time_limit_s=self.time_limit, allowed_sizes=self.sizes)
        with record("adaptive.plan.broadcast", 0):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def __call__(self, batch):
        docs = split_documents(batch.rows)
        lengths = [len(d[0]) for d in docs]
        phased = self.plan(lengths)
        first = phased.phases[0]
        tokens_per_group = [0] * len(first.groups)
        for i, g in zip(phased.doc_ids[0], first.assignment):
            tokens_per_group[g] += lengths[i]
        self.last = {"plan_group_sizes": [s for _, s in first.groups], "plan_tokens_per_group": tokens_per_group,
                     "plan_predicted_s": phased.predicted_time_s, "plan_solve_s": phased.solve_time_s,
                     "plan_solver": first.solver, "plan_methods": list(first.methods),
                     "plan_phases": [[s for _, s in p.groups] for p in phased.phases]}
        for plan, ids in zip(phased.phases, phased.doc_ids):
            yield from self._phase(plan, [docs[i] for i in ids], [lengths[i] for i in ids])

    def _phase(self, plan, docs, lengths):
        """This rank's micro-batches of one phase (``plan`` over these documents)."""
        from .plan import ShardPlan

        ensure_groups(self.groups, plan.groups)  # same plan on every rank: same order
        for (first, size), method in zip(plan.groups, plan.methods):
            if method == "usp" and (first, size) not in self.usp_groups:
                self.usp_groups[(first, size)] = usp_groups_for(first, size, self.cost_model.n_heads)
        work = my_work(plan, lengths, self.rank)
        group = self.groups[(work.first, work.size)]
        method = plan.methods[plan.group_of_rank(self.rank)]
        for ids in pack_group(work.doc_ids, lengths, work.size * self.memory_tokens):
            tokens, labels, positions = (torch.cat([docs[i][k] for i in ids]) for k in range(3))
            sources = None if any(docs[i][3] is None for i in ids) else torch.cat([docs[i][3] for i in ids])
            doc_lens = [lengths[i] for i in ids]
            if work.size == 1:
                yield tokens, labels, positions, VarlenContext.from_lengths(doc_lens), sources
                continue
            cu = [0, *torch.tensor(doc_lens).cumsum(0).tolist()]
            shard = ShardPlan.build(cu, work.size, "contiguous" if method == "ulysses" else DEFAULT_LAYOUT[method])
            r = self.rank - work.first
            ulysses_group, ring_group = self.usp_groups.get((work.first, work.size), (None, None))
            ctx = AdaptiveContext(plan=shard, group=group, ulysses_group=ulysses_group, ring_group=ring_group,
                                  method=method)
            yield (shard.shard(tokens, r, pad_value=self.pad_id), shard.shard(labels, r, pad_value=-100),
                   shard.shard(positions, r, pad_value=0), ctx,
                   None if sources is None else shard.shard(sources, r, pad_value=-1))

    def padding(self):
        """A one-token micro-batch without loss tokens, run locally (fsdp2 runs it on the ranks of
        a group the plan gave no document: they still join every parameter all-gather)."""
        return (torch.tensor([self.pad_id]), torch.tensor([-100]), torch.tensor([0]),
                VarlenContext.from_lengths([1]), None)

    def step_metrics(self) -> dict:
        return dict(self.last)
