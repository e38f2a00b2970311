"""The planner's greedy solver (see :mod:`seqshard.parallel.planner`): the smallest makespan target
for which the long sequences, packed whole into whole groups (:meth:`_Packer.pack`), plus the
others in the groups' spare time and in singles, fit the devices (bisection); that mix assigned
two ways, the static degrees that can still win, then local search. Deterministic."""
from __future__ import annotations

import heapq
import math
import time

import numpy as np

from .planner_core import (StepPlan, _assign, _covers, _earliest_finish, _evaluate, _fractional_makespan, _improve,
                           _layout)


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
        sizes, order = self.sizes, self.order
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


IMPROVE_BEST = 2  # candidate plans that get the local search


def _greedy(table, sizes, num_devices, keep=2, node=None, deadline=math.inf):
    """Packed mixes at the smallest target that fits (see :meth:`_Packer.pack`): whole long
    sequences in whole groups, the others longest-first; the class mixes of :func:`_class_mix`
    only when no packed mix can be laid out; the static degrees that can still win; then local
    search (moves, growing the slowest group) on the best few. Past ``deadline`` the optional
    stages are skipped."""
    statics = [{s: num_devices // s} for s in sizes
               if num_devices % s == 0 and np.isfinite(table[:, sizes.index(s)]).all()]
    device_time = (table * np.asarray(sizes)).min(axis=1)  # cheapest device-seconds per sequence
    lo = max(table.min(axis=1).max(), device_time.sum() / num_devices)
    hi = max(lo, min(_fractional_makespan(table, sizes, c) for c in statics)) if statics else lo * 8
    plans = _packed_plans(_Packer(table, sizes, num_devices, lo), lo, hi, node)
    if not plans:
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
    if not plans:
        older = [m for m in (_mix_for_target(table, sizes, num_devices, t) for t in np.geomspace(lo, hi, 6)) if m]
        older += sorted(_ladders(table, sizes, num_devices), key=lambda m: _fractional_makespan(table, sizes, m))[:keep]
        unique = {tuple(sorted(m.items())): m for m in older}.values()
        plans += [p for p in (_evaluate(table, sizes, m, "greedy", node) for m in unique) if p]
    return plans


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
