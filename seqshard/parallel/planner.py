"""Per-step planner for heterogeneity-adaptive scattering (after FlexSP, Wang et al., ASPLOS 2025).

Given the step's sequence lengths and the devices, choose SP groups (contiguous rank ranges of
the allowed sizes covering the devices) and assign every sequence to one group, minimizing the
step's makespan (the slowest group's summed sequence times under the cost model) subject to
memory: a sequence of length L fits a group of d devices when ``L <= d * memory_tokens``.

Solvers (the pieces they share in :mod:`.planner_core`):
- ``greedy`` (:mod:`.planner_greedy`): the smallest makespan target for which the long
  sequences, packed whole into whole groups, plus the others in the groups' spare time and in
  singles, fit the devices (bisection); that mix assigned two ways (packed groups kept, or
  everything longest-first to the earliest finish), the static degrees that can still win, then
  local search. Deterministic.
- ``milp`` (:mod:`.planner_milp`): ``scipy.optimize.milp`` (HiGHS) over length buckets, one
  integer per group size and each bucket's work shared among sizes, in a bisection on the
  makespan, within a time limit that bounds the whole call; the result is never worse than
  greedy (the better plan is returned, with the MILP status and gap).
Pure functions of lengths and sizes: no torch.distributed.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .planner_core import StepPlan, _covers, _evaluate, _time_table, allowed_group_sizes, dividing_sizes
from .planner_greedy import _greedy
from .planner_milp import _milp, integral_lower_bound

__all__ = ["StepPlan", "allowed_group_sizes", "best_static_plan", "dividing_sizes", "integral_lower_bound",
           "lower_bound", "plan_step", "static_plan"]


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
