"""The planner's MILP solver and its tighter lower bound (see :mod:`seqshard.parallel.planner`):
``scipy.optimize.milp`` (HiGHS) over length buckets inside a bisection on the makespan, within a
deadline; and the integral bound, a few MILPs per step, for benchmarks and tests."""
from __future__ import annotations

import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp  # imported here: never inside a timed call

from .planner_core import _evaluate, _improve, _time_table, allowed_group_sizes


MILP_MIN_ROUND_S = 0.006  # no MILP round starts with less time left (HiGHS setup, then the assignment)


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
    res = milp(cost, constraints=LinearConstraint(a, lo, hi),
               integrality=np.concatenate([np.ones(ns), np.zeros(nb * ns)]), bounds=Bounds(np.zeros(nvar), upper), options={"time_limit": max(time_left, 1e-3)})
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
