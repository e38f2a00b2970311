"""Phased plans: a step's sequences split into phases that run one after another, each with its
own groups (ByteScale-style: the SP degree changes between the micro-batches of one step).

One phase (:func:`~seqshard.parallel.planner.plan_step` alone) runs every group side by side, so
a step holding one sequence that needs every device runs its short sequences in that big group
too, paying its communication. Two phases put the sequences that need (or gain from) sequence
parallelism first, planned over all devices, then the rest, planned over all devices again (in
groups of one: the data-parallel part). The step takes the sum of the phases' makespans; the
plan with the smaller predicted time is kept, so two phases are used only where the cost model
says they pay. Pure functions of lengths and sizes, like the planner.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .planner import StepPlan, allowed_group_sizes, plan_step
from .planner_core import _time_table


@dataclass
class PhasedPlan:
    phases: list[StepPlan]  # run in order; each covers every device
    doc_ids: list[list[int]]  # the step's sequence indices of each phase (``assignment`` indexes these)
    predicted_time_s: float  # the phases' makespans summed

    @property
    def solve_time_s(self) -> float:
        return sum(p.solve_time_s for p in self.phases)


def long_sequences(lengths, num_devices: int, *, max_sp: int, memory_tokens: int, cost_model,
                   allowed_sizes=None) -> np.ndarray:
    """Mask of the sequences that a group spends the fewest device-seconds on (``time(L, d) x d``
    smallest at d > 1), which includes those one device cannot hold (their d = 1 time is inf)."""
    sizes = np.asarray(sorted(allowed_sizes or allowed_group_sizes(num_devices, max_sp)))
    table = _time_table(np.asarray(lengths, dtype=np.int64), sizes.tolist(), memory_tokens, cost_model)
    return sizes[(table * sizes).argmin(axis=1)] > 1


def plan_phased(lengths, num_devices: int, *, max_phases: int = 2, **kw) -> PhasedPlan:
    """The step's plan (keywords as :func:`plan_step`): one phase, or the long sequences
    (:func:`long_sequences`) then the rest when that is predicted faster and ``max_phases`` >= 2."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_phases >= 2 and "time_limit_s" in kw:  # up to three plan_step calls share the limit
        kw = {**kw, "time_limit_s": kw["time_limit_s"] / 3}
    one = plan_step(lengths, num_devices, **kw)
    single = PhasedPlan([one], [list(range(len(lengths)))], one.predicted_time_s)
    if max_phases < 2 or len(lengths) < 2:
        return single
    keys = ("max_sp", "memory_tokens", "cost_model", "allowed_sizes")
    long = long_sequences(lengths, num_devices, **{k: kw.get(k) for k in keys})
    if long.all() or not long.any():
        return single
    ids = [np.flatnonzero(long).tolist(), np.flatnonzero(~long).tolist()]
    phases = [plan_step(lengths[i], num_devices, **kw) for i in ids]
    total = sum(p.predicted_time_s for p in phases)
    return PhasedPlan(phases, ids, total) if total < one.predicted_time_s else single
