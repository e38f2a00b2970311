"""Per-step planner for heterogeneity-adaptive scattering (after FlexSP, Wang et al., ASPLOS 2025).

Given the step's sequence lengths and the devices, choose SP groups (contiguous rank ranges of
the allowed sizes covering the devices) and assign every sequence to one group, minimizing the
step's makespan (the slowest group's summed sequence times under the cost model) subject to
memory: a sequence of length L fits a group of d devices when ``L <= d * memory_tokens``.

Solvers:
- ``greedy``: the smallest makespan target for which the long sequences, packed whole into whole
  groups (:meth:`_Packer.pack`), plus the others in the groups' spare time and in singles, fit
  the devices (bisection); that mix assigned two ways (packed groups kept, or everything
  longest-first to the earliest finish), the static degrees that can still win, then local
  search. Deterministic.
- ``milp``: ``scipy.optimize.milp`` (HiGHS) over length buckets, one integer per group size and
  each bucket's work shared among sizes, in a bisection on the makespan, within a time limit
  that bounds the whole call; the result is never worse than greedy (the better plan is
  returned, with the MILP status and gap).
Pure functions of lengths and sizes: no torch.distributed.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp  # imported here: never inside a timed call


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


def _mix_for_target(table, sizes, num_devices, target):
    """Group counts if each sequence takes the smallest group that finishes it within ``target``
    (else its fastest group); ``None`` when that needs more devices than there are.

    Each size class needs ``work / target`` groups; the demand is scaled up to use every device,
    floored, and the leftover devices go to the classes with the largest remainders. A group at
    least as large as the longest sequence's smallest feasible group always exists.
    """
    fits = table <= target
    choice = np.where(fits.any(axis=1), fits.argmax(axis=1), table.argmin(axis=1))
    sizes_arr = np.asarray(sizes)
    groups = np.array([table[choice == j, j].sum() / target for j in range(len(sizes))])
    demand = float((groups * sizes_arr).sum())
    if demand > num_devices * (1 + 1e-9) or demand == 0:
        return None
    scaled = groups * num_devices / demand
    counts = np.floor(scaled).astype(int)
    need = int(sizes_arr[choice].max())  # the group the longest-running choice needs
    if not counts[sizes_arr >= need].any():
        counts[sizes.index(need)] = 1
    spare = num_devices - int((counts * sizes_arr).sum())
    for j in np.argsort(-(scaled - np.floor(scaled)), kind="stable"):
        while spare >= sizes[j] and scaled[j] > counts[j]:
            counts[j] += 1
            spare -= sizes[j]
    while spare < 0:  # the forced large group overdrew: shrink the smallest used classes
        j = int(np.flatnonzero(counts * (sizes_arr < need))[0])
        counts[j] -= 1
        spare += sizes[j]
    counts[0] += spare // sizes[0]
    return {s: int(c) for s, c in zip(sizes, counts) if c}


def _fractional_makespan(table, sizes, counts):
    """A quick lower estimate of a mix's makespan: each sequence in its cheapest class present,
    classes' work spread evenly over their groups. Used only to rank candidate mixes."""
    present = [j for j, s in enumerate(sizes) if counts.get(s)]
    sub = table[:, present]
    best = sub.argmin(axis=1)
    load = [sub[best == k, k].sum() / counts[sizes[j]] for k, j in enumerate(present)]
    return max(max(load), float(sub.min(axis=1).max()))


def _ladders(table, sizes, num_devices):
    """Heterogeneous mixes for long-tailed steps: one group of a size that holds the longest
    sequence, then ``k`` groups of each smaller power-of-two size below it, the rest singles
    (one pack per device: the data-parallel part of a hybrid DP x SP step)."""
    need = min(j for j in range(len(sizes)) if np.isfinite(table[:, j]).all())
    out = []
    for top in range(need, len(sizes)):
        for k in (1, 2, 4):
            counts, left = {sizes[top]: 1}, num_devices - sizes[top]
            for j in range(top - 1, 0, -1):
                c = min(k, left // sizes[j])
                if c:
                    counts[sizes[j]] = counts.get(sizes[j], 0) + c
                    left -= c * sizes[j]
            if left >= 0 and sizes[0] == 1:
                counts[1] = counts.get(1, 0) + left
                out.append({s: c for s, c in counts.items() if c})
    return out


def _class_mix(table, sizes, num_devices, target, rounding="ceil"):
    """Group counts for a makespan ``target``: every sequence in the class (group size) that
    spends the fewest device-seconds on it among those finishing it within ``target`` (short
    sequences in singles: the data-parallel part of a hybrid DP x SP step), then
    ``ceil(class work / target)`` groups per class (``rounding="floor"``: floor, plus one group
    of the largest class any sequence needs); leftover devices become groups of the smallest
    size. ``None`` when that needs more devices than there are, or a sequence fits no group
    within ``target``."""
    sizes_arr = np.asarray(sizes)
    eff = np.where(table <= target, table * sizes_arr, np.inf)
    least = eff.min(axis=1)
    if not np.isfinite(least).all():
        return None
    choice = eff.argmin(axis=1)
    work = np.bincount(choice, weights=table[np.arange(len(table)), choice], minlength=len(sizes))
    if rounding == "ceil":
        n = np.zeros(len(sizes), dtype=int)
        for j in range(len(sizes) - 1, -1, -1):  # largest class first: its last group's spare
            if work[j] <= 0:                       # time takes the longest smaller sequences
                continue
            n[j] = math.ceil(work[j] / target - 1e-9)
            below = np.flatnonzero(choice < j)
            if j == 0 or not len(below):
                continue
            below = below[np.argsort(-table[below, j], kind="stable")]
            fill = np.cumsum(table[below, j])
            moved = below[:int(np.searchsorted(fill, n[j] * target - work[j], side="right"))]
            if len(moved):
                work -= np.bincount(choice[moved], weights=table[moved, choice[moved]], minlength=len(sizes))
                work[j] += table[moved, j].sum()
                choice[moved] = j
    else:
        n = np.floor(work / target).astype(int)
        need = int(choice.max())
        if not n[need:].any():
            n[need] = 1
    used = int((n * sizes_arr).sum())
    if used > num_devices:
        return None
    n[0] += (num_devices - used) // sizes[0]
    return {s: int(c) for s, c in zip(sizes, n) if c}


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


def _grow_bottleneck(table, sizes, plan, node, tries=3):
    """Mix repair: when the slowest group cannot shed a sequence (moves did not help), give it
    the next larger size that runs its sequences faster, paid for with singles; keep the result
    only when the makespan drops."""
    for _ in range(tries):
        g = int(np.argmax(plan.group_times))
        size = plan.groups[g][1]
        counts = {}
        for _, s in plan.groups:
            counts[s] = counts.get(s, 0) + 1
        better = None
        for bigger in (s for s in sizes if s > size and counts.get(1, 0) >= s - size):
            trial = dict(counts)
            trial[size] -= 1
            trial[bigger] = trial.get(bigger, 0) + 1
            trial[1] -= bigger - size
            p = _evaluate(table, sizes, {s: c for s, c in trial.items() if c}, plan.solver, node)
            if p is not None:
                p = _improve(table, sizes, p)
                if p.predicted_time_s < plan.predicted_time_s * (1 - 1e-9):
                    better = p
            break  # the next larger size only
        if better is None:
            return plan
        plan = better
    return plan


class _Packer:
    """Group mixes built around the long sequences (:meth:`pack`), with what every target needs
    precomputed once per step: the sequences longest first (every column of the table is
    monotone in the length, so "does not fit a single group within the target" is a prefix of
    that order and the rest a suffix), and per size the running sums of the sequences' times in
    that order (a fill of a group's spare time is then one ``searchsorted``)."""

    def __init__(self, table, sizes, num_devices, lo=0.0):
        self.table, self.sizes, self.num_devices = table, sizes, num_devices
        self.fastest = table.min(axis=1)  # increasing in the length, as every column is
        self.order = np.argsort(-self.fastest, kind="stable")
        ordered = table[self.order]
        self.sorted_small = ordered[:, 0]  # non-increasing; inf where a single cannot hold it
        self.cum = np.zeros((len(table) + 1, len(sizes)))  # [n + 1, sizes] running sums in that order
        np.cumsum(np.where(np.isfinite(ordered), ordered, 0.0), axis=0, out=self.cum[1:])
        # the sequences a target >= lo may leave out of the singles: their times and device-seconds
        # per size as plain floats (their sizes by device-seconds: :meth:`_choices`, on demand)
        top = int(np.searchsorted(-self.sorted_small, -lo, side="left"))
        self.rows = ordered[:top].tolist()
        self.effs = (ordered[:top] * np.asarray(sizes)).tolist()
        self._by_eff = {}
        self.order_list = self.order.tolist()

    def _choices(self, pos):
        """(time, device-seconds, size index) of sequence ``pos`` per size, cheapest first."""
        if pos not in self._by_eff:
            self._by_eff[pos] = sorted(zip(self.rows[pos], self.effs[pos], range(len(self.sizes))),
                                       key=lambda c: c[1])
        return self._by_eff[pos]

    def pack(self, target):
        """``(counts, packed)`` for a makespan ``target``, or ``None`` when it needs more devices
        than there are; ``packed`` is every group but those of the smallest size as (size index,
        sequences).

        The sequences no group of the smallest size finishes within ``target`` are packed,
        longest first, into an open group where they still finish in time (the one spending
        the fewest device-seconds on them), else into a new group of the size spending the
        fewest device-seconds on them within ``target`` (the smallest of near-ties). Whole
        sequences go to whole groups: the integer placement that decides a heavy-tailed step.
        The groups' spare time, largest groups first, takes the longest other sequences; the
        rest needs ``ceil(work / target)`` groups of the smallest size."""
        table, sizes, order = self.table, self.sizes, self.order
        if self.fastest.max() > target:
            return None
        k = int(np.searchsorted(-self.sorted_small, -target, side="left"))  # first one a single finishes
        if k > len(self.rows):
            raise ValueError(f"target {target} below the packer's lower bound")
        gsize, gload, gitems = [], [], []
        open_ = {}  # size index -> heap of (load, group): an item fits that size iff it fits its least loaded
        used = 0
        for pos in range(k):
            row, eff = self.rows[pos], self.effs[pos]
            best, cost = -1, math.inf
            for j, heap in open_.items():
                if heap[0][0] + row[j] <= target and eff[j] < cost:
                    best, cost = j, eff[j]
            if best < 0:  # a new group: the smallest size within 0.5% of the cheapest that finishes it
                cheapest = None
                for t, e, j in self._choices(pos):
                    if t <= target:
                        if cheapest is None:
                            cheapest, best = e, j
                        elif e > cheapest * 1.005:
                            break
                        elif j < best:
                            best = j
                used += sizes[best]
                if used > self.num_devices:
                    return None  # groups only grow from here
                gsize.append(best)
                gload.append(0.0)
                gitems.append([])
                heapq.heappush(open_.setdefault(best, []), (0.0, len(gsize) - 1))
            g = open_[best][0][1]
            gload[g] += row[best]
            gitems[g].append(self.order_list[pos])
            heapq.heapreplace(open_[best], (gload[g], g))
        p, n = k, len(order)  # the sequences order[p:] are not placed yet
        for g in sorted(range(len(gsize)), key=lambda g: -sizes[gsize[g]]):
            if p < n and gload[g] < target:
                col = self.cum[:, gsize[g]]
                q = int(np.searchsorted(col, col[p] + target - gload[g], side="right")) - 1
                gitems[g] += order[p:q].tolist()
                p = max(p, q)
        work = float(self.cum[n, 0] - self.cum[p, 0])
        smallest = math.ceil(work / target - 1e-9) if work > 0 else 0
        used += smallest * sizes[0]
        if used > self.num_devices:
            return None
        counts = {}
        for j in gsize:
            counts[sizes[j]] = counts.get(sizes[j], 0) + 1
        counts[sizes[0]] = counts.get(sizes[0], 0) + smallest + (self.num_devices - used) // sizes[0]
        return {s: c for s, c in counts.items() if c}, list(zip(gsize, gitems))


def _assign_packed(table, sizes, groups, packed):
    """The packed long sequences stay together (each packed group on a laid-out group of its
    size); every other sequence, longest first, goes to the group finishing it earliest."""
    n = table.shape[0]
    assignment = np.full(n, -1)
    loads = [0.0] * len(groups)
    free = {}
    for g, (_, size) in enumerate(groups):
        free.setdefault(size, []).append(g)
    for j, items in packed:
        g = free[sizes[j]].pop(0)
        assignment[items] = g
        loads[g] = float(table[items, j].sum())
    present = list(dict.fromkeys(size for _, size in groups))
    heaps = [[(loads[g], g) for g, (_, size) in enumerate(groups) if size == s] for s in present]
    for heap in heaps:
        heapq.heapify(heap)
    rest = np.flatnonzero(assignment < 0)
    rest = rest[np.argsort(-table[rest].min(axis=1), kind="stable")]
    cols = [table[rest, sizes.index(s)].tolist() for s in present]
    result = _earliest_finish(rest.tolist(), cols, heaps, assignment.tolist(), loads)
    return result


def _packed_plans(packer, lo, hi, node, rel_tol=1.5e-3):
    """Plans from :meth:`_Packer.pack` at the smallest target it fits: the first of the edges
    1.02 lo, 1.06 lo, 1.25 lo, hi, 1.5 hi where it fits (most steps fit within 2% of lo), then
    bisection between that edge and the one before it down to ``rel_tol * lo``. Each plan keeps
    the packed groups and sends the other sequences longest-first to the earliest finish, or
    sends every sequence longest-first (both kept)."""
    edges = [lo, 1.02 * lo, 1.06 * lo, 1.25 * lo, max(hi, 1.25 * lo)]
    edges.append(1.5 * edges[-1])
    found = {}  # target -> its pack
    for k in range(1, len(edges)):
        found[edges[k]] = packer.pack(edges[k])
        if found[edges[k]] is not None:
            break
    else:
        return []
    a, b = edges[k - 1], edges[k]
    for _ in range(max(1, math.ceil(math.log2((b - a) / (rel_tol * lo))))):
        m = (a + b) / 2
        found[m] = packer.pack(m)
        a, b = (a, m) if found[m] else (m, b)
    plans, table, sizes = [], packer.table, packer.sizes
    for t in (b, b * 1.02, b * 1.05):  # above the smallest target only when its mix cannot be laid out
        packed = found[t] if t in found else packer.pack(t)
        groups = _layout(packed[0], node) if packed else None
        if groups is None:
            continue
        for result in (_assign_packed(table, sizes, groups, packed[1]), _assign(table, sizes, groups)):
            if result is not None:
                plans.append(StepPlan(groups, result[0], max(result[1]), result[1], solver="greedy"))
        if plans:
            break
    return plans


FULL_SEARCH = False  # True: greedy also evaluates the older mixes (for comparisons in benchmarks)


def _greedy(table, sizes, num_devices, keep=2, node=None, deadline=math.inf):
    """Packed mixes at the smallest target that fits (see :meth:`_Packer.pack`): whole long
    sequences in whole groups, the others longest-first; the class mixes of
    :func:`_class_mix` only when no packed mix can be laid out (or ``FULL_SEARCH``); the static
    degrees that can still win; then local search (moves, growing the slowest group) on the
    best few. Past ``deadline`` the optional stages are skipped."""
    statics = [{s: num_devices // s} for s in sizes
               if num_devices % s == 0 and np.isfinite(table[:, sizes.index(s)]).all()]
    device_time = (table * np.asarray(sizes)).min(axis=1)  # cheapest device-seconds per sequence
    lo = max(table.min(axis=1).max(), device_time.sum() / num_devices)
    hi = max(lo, min(_fractional_makespan(table, sizes, c) for c in statics)) if statics else lo * 8
    plans = _packed_plans(_Packer(table, sizes, num_devices, lo), lo, hi, node)
    if not plans or FULL_SEARCH:
        plans += _class_plans(table, sizes, num_devices, lo, hi, node, keep)
    # without size 1 among the sizes, leftover devices may not form a group: such a mix leaves
    # devices idle; keep it only when no plan covers every device
    plans = [p for p in plans if _covers(p, num_devices)] or plans
    best = min((p.predicted_time_s for p in plans if _covers(p, num_devices)), default=np.inf)
    # a static mix has one class, so its estimate is a true lower bound (mean load, longest
    # item): skip the statics that cannot beat the best plan so far
    for m in sorted(statics, key=lambda m: _fractional_makespan(table, sizes, m)):
        if _fractional_makespan(table, sizes, m) >= best or (plans and time.perf_counter() > deadline):
            break
        p = _evaluate(table, sizes, m, "greedy", node)
        if p:
            plans.append(p)
            best = min(best, p.predicted_time_s)
    plans = [p for p in plans if _covers(p, num_devices)] or plans
    plans.sort(key=lambda p: p.predicted_time_s)
    plan = min((_improve(table, sizes, p) for p in plans[:1 if time.perf_counter() > deadline else IMPROVE_BEST]),
               key=lambda p: p.predicted_time_s)
    if time.perf_counter() < deadline:
        plan = _grow_bottleneck(table, sizes, plan, node)
    plan.gap = plan.predicted_time_s / lo - 1  # distance to a lower bound of any plan
    return plan


MILP_MIN_ROUND_S = 0.006  # no MILP round starts with less time left (HiGHS setup, then the assignment)


def _covers(plan, num_devices):
    """Do the plan's groups use every device? (Always, when size 1 is allowed.)"""
    return sum(size for _, size in plan.groups) == num_devices


IMPROVE_BEST = 2  # candidate plans that get the local search


def _class_plans(table, sizes, num_devices, lo, hi, node, keep=2):
    """The previous greedy's candidates: class mixes at the smallest target that fits (numpy
    bisection), assigned to that target; failing those, mixes for targets spread up to the best
    static and ladders."""
    a, b = lo, hi
    if _class_mix(table, sizes, num_devices, b) is None:
        b = None
    else:
        for _ in range(8):
            m = (a + b) / 2
            a, b = (a, m) if _class_mix(table, sizes, num_devices, m) else (m, b)
    targets = ([b, b * 1.05] if b else []) + [lo]
    mixes = [_class_mix(table, sizes, num_devices, t, "ceil" if t != lo else "floor") for t in targets]
    plans = [p for m, t in zip(mixes, targets) if m for p in [_evaluate(table, sizes, m, "greedy", node, t)] if p]
    if not plans or FULL_SEARCH:
        older = [m for m in (_mix_for_target(table, sizes, num_devices, t) for t in np.geomspace(lo, hi, 6)) if m]
        older += sorted(_ladders(table, sizes, num_devices), key=lambda m: _fractional_makespan(table, sizes, m))[:keep]
        unique = {tuple(sorted(m.items())): m for m in older}.values()
        plans += [p for p in (_evaluate(table, sizes, m, "greedy", node) for m in unique) if p]
    return plans


def _buckets(lengths, max_buckets=10):
    """Bucket index per sequence: half-octave length classes, merged down to ``max_buckets``."""
    cls = np.floor(2 * np.log2(np.maximum(lengths, 1))).astype(int)
    uniq = np.unique(cls)
    while len(uniq) > max_buckets:
        cls = cls // 2 * 2 if len(np.unique(cls // 2 * 2)) < len(uniq) else cls // 2
        uniq = np.unique(cls)
    return np.searchsorted(uniq, cls), len(uniq)


def _work_milp(bwork, bmax, sizes, num_devices, target, time_left):
    """A group mix for ``target``, or ``None``: integer groups per size ``n_s`` (at most N
    devices), and the share ``x_bs`` of length bucket b's work put on size s (continuous, only
    where b's longest sequence finishes within ``target`` on s), with every size's work
    ``sum_b x_bs W_bs <= target * n_s``. Few integers (one per size), so HiGHS answers in
    milliseconds; the same model with one bucket per sequence is :func:`_mix_feasible`."""
    nb, ns = bwork.shape
    ok = np.isfinite(bmax) & (bmax <= target)
    if not ok.any(axis=1).all():
        return None
    nvar = ns + nb * ns  # n_s, then x[b, s]
    a = np.zeros((1 + nb + ns, nvar))
    a[0, :ns] = sizes
    for bkt in range(nb):
        a[1 + bkt, ns + bkt * ns: ns + (bkt + 1) * ns] = 1.0
    for j in range(ns):
        a[1 + nb + j, j] = -target
        a[1 + nb + j, ns + j::ns] = np.where(ok[:, j], bwork[:, j], 0.0)
    lo = np.concatenate([[0], np.ones(nb), -np.inf * np.ones(ns)])
    hi = np.concatenate([[num_devices], np.ones(nb), np.zeros(ns)])
    upper = np.concatenate([num_devices // np.asarray(sizes), ok.ravel()]).astype(float)
    cost = np.concatenate([np.asarray(sizes, float), np.zeros(nb * ns)])  # fewest devices used
    res = milp(cost, constraints=LinearConstraint(a, lo, hi), integrality=np.concatenate([np.ones(ns), np.zeros(nb * ns)]),
               bounds=Bounds(np.zeros(nvar), upper), options={"time_limit": max(time_left, 1e-3)})
    if res.x is None:
        return None
    n = np.round(res.x[:ns]).astype(int)
    spare = num_devices - int((n * np.asarray(sizes)).sum())
    n[0] += spare // sizes[0]  # unused devices become groups of the smallest size
    return {s: int(c) for s, c in zip(sizes, n) if c}


def _milp(table, sizes, num_devices, lengths, deadline, upper, node=None):
    """Bisection on the makespan; at each target a MILP over length buckets (:func:`_work_milp`)
    picks the group mix; each mix is assigned exactly (class plan at the target, then local
    search). Returns (best plan or None, status, gap to the fractional lower bound).

    ``deadline`` (a ``time.perf_counter()`` value, the caller's reserve for what follows
    already taken off) bounds the whole search: a round (HiGHS, then the assignment of its mix)
    starts only when the time left exceeds 1.5 times the slowest round so far and at least
    ``MILP_MIN_ROUND_S`` (HiGHS overshoots small limits by its fixed setup cost), and HiGHS gets
    the time left less the slowest assignment so far."""
    bucket, nb = _buckets(lengths)
    bwork = np.array([table[bucket == b].sum(axis=0) for b in range(nb)])
    bmax = np.array([table[bucket == b].max(axis=0) for b in range(nb)])
    device_time = (table * np.asarray(sizes)).min(axis=1)
    bound = lo = max(table.min(axis=1).max(), device_time.sum() / num_devices)
    hi, best, status, slowest, slowest_assign = upper, None, "optimal", 0.0, 0.0
    while hi - lo > 0.01 * lo:
        now = time.perf_counter()
        if deadline - now <= max(1.5 * slowest, MILP_MIN_ROUND_S):
            status = "time limit"
            break
        target = (lo + hi) / 2
        mix = _work_milp(bwork, bmax, sizes, num_devices, target, deadline - now - max(slowest_assign, 1e-3))
        solved = time.perf_counter()
        plan = _evaluate(table, sizes, mix, "milp", node, target) if mix else None
        if plan is not None:
            plan = _improve(table, sizes, plan)
        slowest_assign = max(slowest_assign, time.perf_counter() - solved)
        slowest = max(slowest, time.perf_counter() - now)
        if plan is None:
            lo = target
            continue
        if best is None or plan.predicted_time_s < best.predicted_time_s:
            best = plan
        hi = target
    gap = best.predicted_time_s / bound - 1 if best else None
    return best, status, gap


def plan_step(lengths, num_devices: int, *, max_sp: int, memory_tokens: int, cost_model,
              solver: str = "greedy", time_limit_s: float = 0.05, allowed_sizes=None) -> StepPlan:
    """Groups and sequence assignment for one step (see module docstring).

    With ``solver="milp"``, ``time_limit_s`` bounds the whole call (table, greedy seed and MILP):
    when the MILP cannot finish, the best plan so far is returned with ``status="time limit"``
    and its ``gap`` to the lower bound; the greedy seed then skips its optional refinements
    past the limit too. The search stops at 90% of the limit, keeping the rest as a margin for
    the last steps and a loaded machine. ``solver="greedy"`` ignores the limit (same plan on
    every call)."""
    start = time.perf_counter()
    deadline = start + 0.9 * time_limit_s  # a tenth is kept for what follows the search (methods)
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = sorted(set(allowed_sizes or allowed_group_sizes(num_devices, max_sp, getattr(cost_model, "n_heads", None))))
    table = _time_table(lengths, sizes, memory_tokens, cost_model)
    node = getattr(getattr(cost_model, "profile", None), "devices_per_node", None)
    # the greedy alone is deterministic (no deadline); as the MILP's seed it yields to the limit
    plan = _greedy(table, sizes, num_devices, node=node, deadline=deadline if solver == "milp" else math.inf)
    if solver == "milp":
        milp_plan, status, gap = _milp(table, sizes, num_devices, lengths, deadline, plan.predicted_time_s, node)
        if milp_plan is not None and milp_plan.predicted_time_s < plan.predicted_time_s and (
                _covers(milp_plan, num_devices) or not _covers(plan, num_devices)):
            plan = milp_plan
        plan.solver = "milp" if plan is milp_plan else "milp (greedy kept)"
        plan.status, plan.gap = status, gap if gap is not None else plan.gap
    elif solver != "greedy":
        raise ValueError(f"solver {solver!r} is not greedy or milp")
    _set_methods(plan, lengths, cost_model)
    plan.solve_time_s = time.perf_counter() - start
    return plan


def _set_methods(plan, lengths, cost_model):
    """Each group's method: the cost model's fastest over the sequences it was given (least summed
    time: a group of many short sequences may want another method than its longest alone)."""
    sizes = sorted({size for _, size in plan.groups})
    names, times = cost_model.method_times(lengths, sizes)  # [methods, n, sizes]
    of_group = np.array([sizes.index(size) for _, size in plan.groups])
    assignment = np.asarray(plan.assignment, dtype=np.int64)
    mine = times[:, np.arange(len(assignment)), of_group[assignment]]  # each sequence on its own group's size
    sums = np.stack([np.bincount(assignment, weights=w, minlength=len(plan.groups)) for w in mine], axis=1)
    counts = np.bincount(assignment, minlength=len(plan.groups))
    plan.methods = ["local" if size == 1 else names[k][int(sums[g].argmin())] if counts[g]
                    else cost_model.method_for(1, size)  # a group given nothing: a one-token sequence's
                    for g, (k, (_, size)) in enumerate(zip(of_group, plan.groups))]


def static_plan(lengths, num_devices: int, sp: int, *, memory_tokens: int, cost_model) -> StepPlan:
    """The static baseline: every group of size ``sp``, sequences assigned longest-first."""
    lengths = np.asarray(lengths, dtype=np.int64)
    table = _time_table(lengths, [sp], memory_tokens, cost_model)
    plan = _evaluate(table, [sp], {sp: num_devices // sp}, "static")
    assert plan is not None
    _set_methods(plan, lengths, cost_model)
    return plan


def best_static_plan(lengths, num_devices: int, *, max_sp: int, memory_tokens: int, cost_model) -> StepPlan:
    """The best single SP degree for these lengths (feasible degrees only)."""
    plans = []
    for sp in dividing_sizes(num_devices, max_sp):
        try:
            plans.append(static_plan(lengths, num_devices, sp, memory_tokens=memory_tokens, cost_model=cost_model))
        except ValueError:
            continue
    if not plans:
        raise ValueError(f"no static degree up to {max_sp} fits the longest sequence ({int(np.max(lengths))} tokens)")
    return min(plans, key=lambda p: p.predicted_time_s)


def lower_bound(lengths, num_devices: int, *, max_sp: int, memory_tokens: int, cost_model) -> float:
    """A lower bound on the makespan of any plan (the fractional bound): no plan finishes before
    its longest item on its fastest feasible group, nor before the cheapest device-seconds of all
    sequences spread evenly over the devices."""
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = allowed_group_sizes(num_devices, max_sp)
    table = _time_table(lengths, sizes, memory_tokens, cost_model)
    device_time = (table * np.asarray(sizes)).min(axis=1)
    return float(max(table.min(axis=1).max(), device_time.sum() / num_devices))


def _mix_feasible(table, sizes, num_devices, target, time_limit=10.0):
    """Is there an integer group mix and a FRACTIONAL assignment of the sequences that meets
    ``target``? ``True``/``False``, or ``None`` when HiGHS could not decide within the limit.

    Integer ``n_s`` groups per size with ``sum s n_s <= N``; ``x_is >= 0`` the part of sequence i
    on size s (0 where it does not finish within ``target`` there), ``sum_s x_is = 1``; and per
    size ``sum_i t_is x_is <= target * n_s``."""
    n, k = table.shape
    ok = np.isfinite(table) & (table <= target)
    if not ok.any(axis=1).all():
        return False
    rows_i, cols_s = np.nonzero(ok)
    m = len(rows_i)
    nvar = k + m
    from scipy.sparse import coo_matrix

    r = [np.zeros(k, int), 1 + rows_i, 1 + n + cols_s, 1 + n + np.arange(k)]
    c = [np.arange(k), k + np.arange(m), k + np.arange(m), np.arange(k)]
    v = [np.asarray(sizes, float), np.ones(m), table[rows_i, cols_s], -target * np.ones(k)]
    a = coo_matrix((np.concatenate(v), (np.concatenate(r), np.concatenate(c))), shape=(1 + n + k, nvar)).tocsr()
    lo = np.concatenate([[0], np.ones(n), -np.inf * np.ones(k)])
    hi = np.concatenate([[num_devices], np.ones(n), np.zeros(k)])
    upper = np.concatenate([num_devices // np.asarray(sizes), np.ones(m)]).astype(float)
    res = milp(np.zeros(nvar), constraints=LinearConstraint(a, lo, hi),
               integrality=np.concatenate([np.ones(k), np.zeros(m)]), bounds=Bounds(np.zeros(nvar), upper),
               options={"time_limit": time_limit})
    if res.status == 0:
        return True
    if res.status == 2:
        return False
    return None


def integral_lower_bound(lengths, num_devices: int, *, max_sp: int, memory_tokens: int, cost_model,
                         allowed_sizes=None, rel_tol: float = 2e-3, upper: float | None = None) -> float:
    """A lower bound on the makespan of any plan that respects that groups are whole: tighter
    than :func:`lower_bound`, slower (a few MILPs; for benchmarks and tests, not per step).

    Why it is a bound: take any plan, with makespan M. Let n_s be its number of groups of size s
    and x_is = 1 when it puts sequence i in a group of size s. Then sum_s s n_s <= N (the groups
    are disjoint), every sequence is placed once, x_is = 1 only where t_is <= M (its group's
    time includes t_is), and the sequences on size-s groups sum to at most M n_s (each of those
    n_s groups takes at most M). So (n, x) satisfies :func:`_mix_feasible` at target M, and
    feasibility there only gets easier as the target grows. Hence every target that HiGHS
    proves infeasible is below M for every plan; the bound returned is the largest target
    proven infeasible by bisection (``rel_tol`` its relative width). It is never below
    :func:`lower_bound`, which starts the bisection (a relaxation of the same problem: x and
    n both fractional). ``upper``: the makespan of a plan over the same sizes (feasible by the
    argument above, so the bisection starts from it without a solve)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = list(allowed_sizes or allowed_group_sizes(num_devices, max_sp))
    table = _time_table(lengths, sizes, memory_tokens, cost_model)
    device_time = (table * np.asarray(sizes)).min(axis=1)
    lo = float(max(table.min(axis=1).max(), device_time.sum() / num_devices)) * (1 - 1e-9)
    hi = upper if upper is not None and upper > lo else lo * 1.05
    while (verdict := _mix_feasible(table, sizes, num_devices, hi)) is not True:
        lo = hi if verdict is False else lo  # only a proven infeasibility may raise the bound
        hi *= 1.25
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        verdict = _mix_feasible(table, sizes, num_devices, mid)
        if verdict is False:
            lo = mid
        else:  # feasible, or undecided: only a proven infeasibility may raise the bound
            hi = mid
    return float(lo)
