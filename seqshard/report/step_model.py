"""Predicted step times of a spec's run on this machine: the cost model applied to the very
micro-batches the runtime forms (the bench's and the calibration's shared prediction).

For every step of the spec's data (rebuilt from its seed), each rank's micro-batches:
- static layouts (``sp_method`` none / ulysses / ring / ...): replica ``dp_rank`` takes rows
  ``dp_rank::dp`` and packs them into micro-batches of ``micro_batch_tokens`` (the trainer's
  :class:`~seqshard.train.trainer.StaticScatter`), each sharded over the SP group;
- adaptive: rank 0's plan (:func:`~seqshard.parallel.planner.plan_step`), each group's documents
  packed as :class:`~seqshard.parallel.adaptive.AdaptiveScatter` packs them.
Each micro-batch is priced by :meth:`CostModel.microbatch_time`; a step is its slowest replica or
group plus the profile's per-step cost.
"""
from __future__ import annotations

from dataclasses import replace


def step_parts(spec, batch, cost_model, world: int):
    """``[(seconds of every micro-batch), ...]`` per replica (static) or group (adaptive) of one step."""
    from seqshard.parallel.adaptive import pack_group, planner_memory_tokens
    from seqshard.parallel.planner import plan_step
    from seqshard.train.trainer import micro_batches

    p = spec.parallel
    if p.sp_method == "adaptive":
        memory = planner_memory_tokens(spec, world)
        cm = replace(cost_model, pack_tokens=memory)
        lengths = [n for row in batch.rows for n in row.doc_lens]
        plan = plan_step(lengths, world, max_sp=p.max_sp, memory_tokens=memory, cost_model=cm,
                         solver=p.planner.solver, time_limit_s=p.planner.time_limit_s)
        parts = []
        for g, (_, size) in enumerate(plan.groups):
            ids = [i for i, a in enumerate(plan.assignment) if a == g]
            parts.append([cm.microbatch_time([lengths[i] for i in mb], size, plan.methods[g])
                          for mb in pack_group(ids, lengths, size * memory)])
        return parts
    sp = 1 if p.sp_method == "none" else p.sp
    method = "local" if sp == 1 else p.sp_method
    dp = world // sp
    budget = spec.data.micro_batch_tokens or spec.data.max_seq_len
    return [[cost_model.microbatch_time([n for row in mb for n in row.doc_lens], sp, method)
             for mb in micro_batches(batch.rows[r::dp], budget)] for r in range(dp)]


def predict_steps(spec, cost_model, world: int, steps: int | None = None, corpus=None) -> list[float]:
    """Predicted seconds of each of the first ``steps`` steps (default ``train.steps``)."""
    from seqshard.train.evaluate import load_data
    from seqshard.train.trainer import build_batch_builder

    builder = build_batch_builder(spec, corpus if corpus is not None else load_data(spec, 0)[0])
    out = []
    for _ in range(steps or spec.train.steps):
        parts = step_parts(spec, builder.next_batch(), cost_model, world)
        out.append(max(sum(p) for p in parts) + cost_model.profile.step_overhead_s)
    return out
