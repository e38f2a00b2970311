"""The planner's shared pieces (see :mod:`seqshard.parallel.planner`): the plan record, the group
sizes, the time table, the layout of a group mix on the devices, the longest-first assignment of
sequences to a laid-out mix, and the local search that follows. Pure functions of lengths and
sizes: no torch.distributed."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepPlan:
    groups: list[tuple[int, int]]  # (first_rank, size), aligned, disjoint, covering all devices
    assignment: list[int]  # group index of every sequence
    predicted_time_s: float  # makespan under the cost model
    group_times: list[float] = field(default_factory=list)
    solver: str = "greedy"
    status: str = "ok"
    gap: float | None = None
    solve_time_s: float = 0.0
    methods: list[str] = field(default_factory=list)  # SP method of every group (local for size 1)

    def group_of_rank(self, rank: int) -> int:
        for g, (first, size) in enumerate(self.groups):
            if first <= rank < first + size:
                return g
        raise AssertionError(f"rank {rank} not covered by {self.groups}")


def allowed_group_sizes(num_devices: int, max_sp: int, n_heads: int | None = None) -> list[int]:
    """Group sizes up to ``min(max_sp, num_devices)``: the powers of two and three times the
    powers of two (1, 2, 3, 4, 6, 8, 12, 16, 24, ...). Sizes need not divide the device count nor
    be powers of two (FCP-style arbitrary degrees): a mix is any set of groups whose sizes sum to
    the devices. The head count does not cap them either: a group past it (or not dividing it)
    runs uneven Ulysses, USP or Ring inside (``n_heads`` is kept for callers; the cost model picks
    the method per group). Pass ``allowed_sizes`` to :func:`plan_step` for any other set."""
    top = min(max_sp, num_devices)
    sizes, s = set(), 1
    while s <= top:
        sizes |= {s} | ({3 * s} if 3 * s <= top else set())
        s *= 2
    return sorted(sizes)


def dividing_sizes(num_devices: int, max_sp: int) -> list[int]:
    """The static degrees a user can run: powers of two up to ``max_sp`` dividing the devices."""
    return [s for s in allowed_group_sizes(num_devices, max_sp) if num_devices % s == 0 and not s & (s - 1)]


def _time_table(lengths, sizes, memory_tokens, cost_model):
    """[n, |sizes|] predicted seconds, inf where the sequence does not fit the group's memory."""
    lengths_f = np.asarray(lengths, dtype=np.float64)
    fits = lengths_f[:, None] <= np.asarray(sizes) * float(memory_tokens)
    table = np.where(fits, cost_model.method_times(lengths_f, sizes)[1].min(axis=0), np.inf)
    unfit = np.isinf(table).all(axis=1)
    if unfit.any():
        i = int(np.flatnonzero(unfit)[0])
        raise ValueError(f"sequence {i} of length {int(lengths[i])} does not fit: the largest group, "
                         f"ring/USP over {max(sizes)} devices x memory_tokens {memory_tokens}, holds "
                         f"{max(sizes) * memory_tokens} tokens (memory bound L <= group size x "
                         f"memory_tokens); raise parallel.max_sp or memory, or split the sequence")
    return table


def _layout(counts: dict[int, int], node: int | None = None):
    """Contiguous rank ranges from {size: count}, largest first, sorted by first rank; ``None``
    when a group no larger than a node (``node`` devices) would have to straddle two nodes.

    Groups of at least a node start on a node boundary; smaller ones go first-fit into the
    nodes' free tails, so a group the cost model prices at intra-node bandwidth stays in one
    node. With powers of two only, this is the aligned layout (every offset a multiple of the
    size). ``node=None``: one node holds everything."""
    total = sum(size * c for size, c in counts.items())
    node = node or total
    starts = list(range(0, total, node))  # next free rank of every node
    free = [min(node, total - k) for k in starts]  # free devices of every node (the last may be partial)
    groups = []
    for size in sorted(counts, reverse=True):
        for _ in range(counts[size]):
            if size >= node:
                k = next((k for k, f in enumerate(free) if f == node), None)
                span = -(-size // node)
                if k is None or sum(free[k:k + span]) < size or any(f != node for f in free[k:k + span - 1]):
                    return None
                groups.append((starts[k], size))
                for j in range(k, k + span):
                    take = min(free[j], size - (j - k) * node)
                    free[j] -= take
                    starts[j] += take
            else:
                k = next((k for k, f in enumerate(free) if f >= size), None)
                if k is None:
                    return None
                groups.append((starts[k], size))
                free[k] -= size
                starts[k] += size
    return sorted(groups)


def _assign(table, sizes, groups, target=None):
    """Longest-first, each sequence to the group that finishes it earliest (per-size heaps).
    With a ``target``: to the least-loaded group of the size that spends the fewest
    device-seconds on it among those still finishing within ``target`` (the class plan of
    :func:`_class_mix`), else the earliest finish.

    Plain Python floats in the loop: it runs once per candidate mix, several mixes per step."""
    present = list(dict.fromkeys(size for _, size in groups))  # sizes in layout order
    heaps = [[(0.0, g) for g, (_, size) in enumerate(groups) if size == s] for s in present]
    order = np.argsort(-table.min(axis=1), kind="stable")  # longest first (every row has a finite time)
    cols = [table[order, sizes.index(s)].tolist() for s in present]  # [size][position in order]
    assignment = [0] * table.shape[0]
    loads = [0.0] * len(groups)
    if target is None:
        return _earliest_finish(order.tolist(), cols, heaps, assignment, loads)
    for pos, i in enumerate(order.tolist()):
        best_t, best_k, best_key = math.inf, -1, (2, math.inf)
        for k, heap in enumerate(heaps):
            t = heap[0][0] + cols[k][pos]  # inf where sequence i does not fit size k
            key = (0, cols[k][pos] * present[k]) if t <= target else (1, t)
            if key < best_key:
                best_t, best_k, best_key = t, k, key
        if best_k < 0:
            return None  # no group in this mix can hold sequence i
        _, g = heapq.heapreplace(heaps[best_k], (best_t, heaps[best_k][0][1]))
        assignment[i], loads[g] = g, best_t
    return assignment, loads


def _earliest_finish(items, cols, heaps, assignment, loads):
    """The longest-first loop: ``items[pos]`` to the least-loaded group of the size k where it
    finishes first (``cols[k][pos]`` its time there, inf where it does not fit; ``heaps[k]`` the
    (load, group) heap of size k). Fills ``assignment`` and ``loads``; ``None`` if an item fits
    no group."""
    replace = heapq.heapreplace
    ks = range(len(heaps))
    for pos, i in enumerate(items):
        best_t, best_k = math.inf, -1
        for k in ks:
            t = heaps[k][0][0] + cols[k][pos]
            if t < best_t:
                best_t, best_k = t, k
        if best_k < 0:
            return None
        heap = heaps[best_k]
        g = heap[0][1]
        replace(heap, (best_t, g))
        assignment[i] = g
        loads[g] = best_t
    return assignment, loads


def _evaluate(table, sizes, counts, solver, node=None, target=None):
    groups = _layout(counts, node)
    if groups is None:
        return None
    result = _assign(table, sizes, groups, target)
    if result is None:
        return None
    assignment, loads = result
    return StepPlan(groups, assignment, max(loads), loads, solver=solver)


def _fractional_makespan(table, sizes, counts):
    """A quick lower estimate of a mix's makespan: each sequence in its cheapest class present,
    classes' work spread evenly over their groups. Used only to rank candidate mixes."""
    present = [j for j, s in enumerate(sizes) if counts.get(s)]
    sub = table[:, present]
    best = sub.argmin(axis=1)
    load = [sub[best == k, k].sum() / counts[sizes[j]] for k, j in enumerate(present)]
    return max(max(load), float(sub.min(axis=1).max()))


def _improve(table, sizes, plan, max_moves=64):
    """Local search after a greedy assignment: move one sequence off the slowest group to the
    group where it would finish earliest, while that lowers the slowest group's time (the
    makespan never grows; it stops at a local optimum or after ``max_moves`` moves)."""
    cols = np.array([sizes.index(s) for _, s in plan.groups])
    loads = np.array(plan.group_times, dtype=np.float64)
    assignment = np.array(plan.assignment)
    for _ in range(max_moves):
        g = int(loads.argmax())
        items = np.flatnonzero(assignment == g)
        if len(items) < 2:
            break
        moved = False
        for i in items[np.argsort(-table[items, cols[g]])]:
            finish = loads + table[i, cols]
            finish[g] = np.inf
            h = int(finish.argmin())
            if finish[h] < loads[g] - 1e-12 * loads[g]:
                loads[h], loads[g] = finish[h], loads[g] - table[i, cols[g]]
                assignment[i], moved = h, True
                break
        if not moved:
            break
    plan.assignment, plan.group_times = assignment.tolist(), loads.tolist()
    plan.predicted_time_s = float(loads.max())
    return plan


def _covers(plan, num_devices):
    """Do the plan's groups use every device? (Always, when size 1 is allowed.)"""
    return sum(size for _, size in plan.groups) == num_devices
