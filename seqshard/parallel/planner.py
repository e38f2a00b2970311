"""Per-step planner for heterogeneity-adaptive scattering (after FlexSP, Wang et al., ASPLOS 2025).

Given the step's sequence lengths and the devices, choose SP groups of power-of-two sizes
(aligned rank ranges covering the devices) and assign every sequence to one group, minimizing the
step's makespan (the slowest group's summed sequence times under the cost model) subject to
memory: a sequence of length L fits a group of d devices when ``L <= d * memory_tokens``.

Solvers:
- ``greedy``: for a handful of group mixes (every static degree, and mixes built from a
  makespan target by giving each sequence the smallest group that finishes it in time), assign
  sequences longest-first to the group that would finish them earliest; keep the best mix.
- ``milp``: ``scipy.optimize.milp`` (HiGHS) over length buckets, one binary per candidate group
  and integer counts of each bucket per group, minimizing the makespan within a time limit; the
  result is never worse than greedy (the better plan is returned, with the MILP status and gap).
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
    """Powers of two up to ``max_sp`` dividing the device count. The head count no longer caps
    them: a group past it (or not dividing it) runs Ring or USP inside (``n_heads`` is kept for
    callers; the cost model picks the method per group)."""
    sizes, s = [], 1
    while s <= min(max_sp, num_devices):
        if num_devices % s == 0:
            sizes.append(s)
        s *= 2
    return sizes


def _time_table(lengths, sizes, memory_tokens, cost_model):
    """[n, |sizes|] predicted seconds, inf where the sequence does not fit the group's memory."""
    lengths_f = np.asarray(lengths, dtype=np.float64)
    table = np.stack([np.where(lengths_f <= s * memory_tokens, cost_model.time(lengths_f, s), np.inf)
                      for s in sizes], axis=1).reshape(len(lengths), len(sizes))
    unfit = np.isinf(table).all(axis=1)
    if unfit.any():
        i = int(np.flatnonzero(unfit)[0])
        raise ValueError(f"sequence {i} of length {int(lengths[i])} does not fit: the largest group, "
                         f"ring/USP over {max(sizes)} devices x memory_tokens {memory_tokens}, holds "
                         f"{max(sizes) * memory_tokens} tokens (memory bound L <= group size x "
                         f"memory_tokens); raise parallel.max_sp or memory, or split the sequence")
    return table


def _layout(counts: dict[int, int]) -> list[tuple[int, int]]:
    """Aligned groups from {size: count}: largest first, so every offset is a multiple of the size."""
    groups, first = [], 0
    for size in sorted(counts, reverse=True):
        for _ in range(counts[size]):
            groups.append((first, size))
            first += size
    return groups


def _assign(table, sizes, groups):
    """Longest-first, each sequence to the group that finishes it earliest (per-size heaps).

    Plain Python floats in the loop: it runs once per candidate mix, several mixes per step."""
    present = list(dict.fromkeys(size for _, size in groups))  # sizes in layout order
    heaps = [[(0.0, g) for g, (_, size) in enumerate(groups) if size == s] for s in present]
    order = np.argsort(-np.nanmin(np.where(np.isinf(table), np.nan, table), axis=1), kind="stable")
    cols = [table[order, sizes.index(s)].tolist() for s in present]  # [size][position in order]
    assignment = [0] * table.shape[0]
    loads = [0.0] * len(groups)
    for pos, i in enumerate(order.tolist()):
        best_t, best_k = math.inf, -1
        for k, heap in enumerate(heaps):
            t = heap[0][0] + cols[k][pos]  # inf where sequence i does not fit size k
            if t < best_t:
                best_t, best_k = t, k
        if best_k < 0:
            return None  # no group in this mix can hold sequence i
        _, g = heapq.heapreplace(heaps[best_k], (best_t, heaps[best_k][0][1]))
        assignment[i], loads[g] = g, best_t
    return assignment, loads


def _evaluate(table, sizes, counts, solver):
    groups = _layout(counts)
    result = _assign(table, sizes, groups)
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


def _greedy(table, sizes, num_devices, keep=4):
    statics = [{s: num_devices // s} for s in sizes if np.isfinite(table[:, sizes.index(s)]).all()]
    device_time = (table * np.asarray(sizes)).min(axis=1)  # cheapest device-seconds per sequence
    lo = max(table.min(axis=1).max(), device_time.sum() / num_devices)
    hi = max(lo, min(_fractional_makespan(table, sizes, c) for c in statics)) if statics else lo * 8
    mixes = [m for m in (_mix_for_target(table, sizes, num_devices, t) for t in np.geomspace(lo, hi, 10)) if m]
    unique = {tuple(sorted(m.items())): m for m in mixes + statics + _ladders(table, sizes, num_devices)}.values()
    ranked = sorted(unique, key=lambda m: _fractional_makespan(table, sizes, m))
    plans = [p for p in (_evaluate(table, sizes, m, "greedy") for m in ranked[:keep]) if p]
    best = min((p.predicted_time_s for p in plans), default=np.inf)
    # a static mix has one class, so its estimate is a true lower bound (mean load, longest
    # item): skip the statics that cannot beat the best plan so far
    for m in sorted(statics, key=lambda m: _fractional_makespan(table, sizes, m)):
        if _fractional_makespan(table, sizes, m) >= best:
            break
        p = _evaluate(table, sizes, m, "greedy")
        if p:
            plans.append(p)
            best = min(best, p.predicted_time_s)
    plan = min(plans, key=lambda p: p.predicted_time_s)
    plan.gap = plan.predicted_time_s / lo - 1  # distance to a lower bound of any plan
    return plan


def _buckets(lengths, max_buckets=10):
    """Bucket index per sequence: half-octave length classes, merged down to ``max_buckets``."""
    cls = np.floor(2 * np.log2(np.maximum(lengths, 1))).astype(int)
    uniq = np.unique(cls)
    while len(uniq) > max_buckets:
        cls = cls // 2 * 2 if len(np.unique(cls // 2 * 2)) < len(uniq) else cls // 2
        uniq = np.unique(cls)
    return np.searchsorted(uniq, cls), len(uniq)


def _class_milp(btime, counts, sizes, num_devices, target, time_left):
    """Is there a mix meeting ``target``? Integer groups per size n_s and sequences of bucket b
    per size x_bs with every class's work <= target * n_s, every item <= target, devices <= N."""
    nb, ns = btime.shape
    ok = np.isfinite(btime) & (btime <= target)
    nvar = ns + nb * ns  # n_s, then x[b, s]
    a_rows, lo, hi = [], [], []
    row = np.zeros(nvar)
    row[:ns] = sizes
    a_rows.append(row), lo.append(0), hi.append(num_devices)
    for b in range(nb):
        row = np.zeros(nvar)
        row[ns + b * ns: ns + (b + 1) * ns] = ok[b]
        a_rows.append(row), lo.append(counts[b]), hi.append(counts[b])
    for j in range(ns):
        row = np.zeros(nvar)
        row[j] = -target
        for b in range(nb):
            row[ns + b * ns + j] = btime[b, j] if ok[b, j] else 0.0
        a_rows.append(row), lo.append(-np.inf), hi.append(0.0)
    upper = np.concatenate([np.asarray(num_devices // np.asarray(sizes), float),
                            np.where(ok, counts[:, None], 0).ravel()])
    cost = np.concatenate([np.asarray(sizes, float), np.zeros(nb * ns)])  # fewest devices used
    res = milp(cost, constraints=LinearConstraint(np.array(a_rows), lo, hi), integrality=np.ones(nvar),
               bounds=Bounds(np.zeros(nvar), upper), options={"time_limit": max(time_left, 1e-3)})
    if res.x is None:
        return None
    n = np.round(res.x[:ns]).astype(int)
    spare = num_devices - int((n * np.asarray(sizes)).sum())
    n[0] += spare // sizes[0]  # unused devices become groups of the smallest size
    return {s: int(c) for s, c in zip(sizes, n) if c}


def _milp(table, sizes, num_devices, lengths, deadline, upper):
    """Bisection on the makespan; at each target a MILP over length buckets picks the group mix;
    each mix is assigned exactly. Returns (best plan or None, status, gap to the bound).

    ``deadline`` (a ``time.perf_counter()`` value) bounds the whole search: HiGHS gets the time
    left, and no new MILP starts when less time is left than the slowest one so far took (HiGHS
    overshoots small limits by its fixed setup cost)."""
    bucket, nb = _buckets(lengths)
    counts = np.bincount(bucket, minlength=nb)
    btime = np.array([[table[bucket == b, j].max() for j in range(len(sizes))] for b in range(nb)])
    device_time = (table * np.asarray(sizes)).min(axis=1)
    lo = max(table.min(axis=1).max(), device_time.sum() / num_devices)
    hi, best, status, slowest = upper, None, "optimal", 0.0
    while hi - lo > 0.01 * lo:
        now = time.perf_counter()
        if deadline - now <= slowest:
            status = "time limit"
            break
        target = (lo + hi) / 2
        mix = _class_milp(btime, counts, sizes, num_devices, target, deadline - now)
        slowest = max(slowest, time.perf_counter() - now)
        plan = _evaluate(table, sizes, mix, "milp") if mix else None
        if plan is None:
            lo = target
            continue
        if best is None or plan.predicted_time_s < best.predicted_time_s:
            best = plan
        hi = min(target, plan.predicted_time_s)
    gap = best.predicted_time_s / lo - 1 if best else None
    return best, status, gap


def plan_step(lengths, num_devices: int, *, max_sp: int, memory_tokens: int, cost_model,
              solver: str = "greedy", time_limit_s: float = 0.05, allowed_sizes=None) -> StepPlan:
    """Groups and sequence assignment for one step (see module docstring).

    With ``solver="milp"``, ``time_limit_s`` bounds the whole call (table, greedy seed and MILP):
    when the MILP cannot finish, the best plan so far is returned with ``status="time limit"``
    and its ``gap`` to the lower bound."""
    start = time.perf_counter()
    deadline = start + time_limit_s
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = list(allowed_sizes or allowed_group_sizes(num_devices, max_sp, getattr(cost_model, "n_heads", None)))
    table = _time_table(lengths, sizes, memory_tokens, cost_model)
    plan = _greedy(table, sizes, num_devices)
    if solver == "milp":
        milp_plan, status, gap = _milp(table, sizes, num_devices, lengths, deadline, plan.predicted_time_s)
        if milp_plan is not None and milp_plan.predicted_time_s < plan.predicted_time_s:
            plan = milp_plan
        plan.solver = "milp" if plan is milp_plan else "milp (greedy kept)"
        plan.status, plan.gap = status, gap if gap is not None else plan.gap
    elif solver != "greedy":
        raise ValueError(f"solver {solver!r} is not greedy or milp")
    _set_methods(plan, lengths, cost_model)
    plan.solve_time_s = time.perf_counter() - start
    return plan


def _set_methods(plan, lengths, cost_model):
    """Each group's method: the cost model's fastest for the longest sequence it was given."""
    longest = [0] * len(plan.groups)
    for length, g in zip(lengths.tolist(), plan.assignment):
        longest[g] = max(longest[g], length)
    plan.methods = [cost_model.method_for(max(n, 1), size) if size > 1 else "local"
                    for n, (_, size) in zip(longest, plan.groups)]


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
    for sp in allowed_group_sizes(num_devices, max_sp, getattr(cost_model, "n_heads", None)):
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
