"""Predicted step times of a spec's run on this machine: the cost model applied to the very
micro-batches the runtime forms (the bench's and the calibration's shared prediction).

For every step of the spec's data (rebuilt from its seed), each rank's micro-batches:
- static layouts (``sp_method`` none / ulysses / ring / ...): replica ``dp_rank`` takes rows
  ``dp_rank::dp`` and packs them into micro-batches of ``micro_batch_tokens`` (the trainer's
  :class:`~seqshard.train.trainer.StaticScatter`), each sharded over the SP group;
- adaptive: rank 0's plan (:func:`~seqshard.parallel.phases.plan_phased`), each group's documents
  packed as :class:`~seqshard.parallel.adaptive.AdaptiveScatter` packs them.
Each micro-batch is priced by :meth:`CostModel.microbatch_time`; a step is its slowest replica or
group (summed over an adaptive step's phases) plus the profile's per-step cost (and its
``adaptive_step_s`` for an adaptive step).
"""
from __future__ import annotations

from dataclasses import replace


def step_phases(spec, batch, cost_model, world: int):
    """One step's phases, each ``[(seconds of every micro-batch), ...]`` per replica (static: one
    phase) or per group (adaptive: one or two phases, :mod:`seqshard.parallel.phases`)."""
    from seqshard.parallel.adaptive import pack_group, planner_memory_tokens
    from seqshard.parallel.phases import plan_phased
    from seqshard.train.trainer import micro_batches

    p = spec.parallel
    if p.sp_method == "adaptive":
        memory = planner_memory_tokens(spec, world)
        cm = replace(cost_model, pack_tokens=memory)
        lengths = [n for row in batch.rows for n in row.doc_lens]
        phased = plan_phased(lengths, world, max_phases=p.planner.max_phases, max_sp=p.max_sp, memory_tokens=memory,
                             cost_model=cm, solver=p.planner.solver, time_limit_s=p.planner.time_limit_s)
        phases = []
        for plan, doc_ids in zip(phased.phases, phased.doc_ids):
            sub = [lengths[i] for i in doc_ids]
            groups = []
            for g, (_, size) in enumerate(plan.groups):
                ids = [i for i, a in enumerate(plan.assignment) if a == g]
                groups.append([cm.microbatch_time([sub[i] for i in mb], size, plan.methods[g])
                               for mb in pack_group(ids, sub, size * memory)])
            phases.append(groups)
        return phases
    sp = 1 if p.sp_method == "none" else p.sp
    method = "local" if sp == 1 else p.sp_method
    dp = world // sp
    budget = spec.data.micro_batch_tokens or spec.data.max_seq_len
    return [[[cost_model.microbatch_time([n for row in mb for n in row.doc_lens], sp, method)
              for mb in micro_batches(batch.rows[r::dp], budget)] for r in range(dp)]]


def predict_steps(spec, cost_model, world: int, steps: int | None = None, corpus=None) -> list[float]:
    """Predicted seconds of each of the first ``steps`` steps (default ``train.steps``)."""
    from seqshard.train.evaluate import load_data
    from seqshard.train.trainer import build_batch_builder

    builder = build_batch_builder(spec, corpus if corpus is not None else load_data(spec, 0)[0])
    per_step = cost_model.profile.step_overhead_s
    per_step += cost_model.profile.adaptive_step_s if spec.parallel.sp_method == "adaptive" else 0.0
    out = []
    for _ in range(steps or spec.train.steps):
        phases = step_phases(spec, builder.next_batch(), cost_model, world)
        out.append(sum(max(sum(g) for g in groups) for groups in phases) + per_step)
    return out
