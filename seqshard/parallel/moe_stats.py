"""Per-document sums of MoE router statistics under sequence parallelism (models/moe.py's
load-balancing loss). ``parallelize()`` installs these on a model with ``doc_sums_fn``.

``sp_doc_sums``: this rank's rows ``[T/P, F]`` summed per document of the micro-batch's ShardPlan
(padding rows belong to no document) -> ``[N_docs, F]``, differentiable (each rank's share of the
router probabilities). ``sp_doc_reduce``: those sums added over the SP group, without gradient (the
assignment counts, token and loss-token numbers: constants of the loss). Every rank of the group
calls it once per forward, one holding only padding too (DESIGN.md invariant 8).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from seqshard.dist.comm_stats import record


def _local_docs(plan, rank) -> np.ndarray:
    """Document index of each local row, -1 for padding."""
    idx = plan.index[rank]
    doc = np.searchsorted(np.asarray(plan.cu_seqlens), idx, side="right") - 1
    return np.where(idx >= 0, doc, -1)


def sp_doc_sums(x, ctx):
    docs = torch.from_numpy(_local_docs(ctx.plan, dist.get_rank(ctx.group))).to(x.device)
    real = docs >= 0
    out = x.new_zeros(len(ctx.plan.cu_seqlens) - 1, x.shape[1])
    return out.index_add(0, docs[real], x[real])


def sp_doc_reduce(doc_sums, ctx):
    total = doc_sums.detach().clone()
    with record("all_reduce.moe_counts", total.numel() * total.element_size()):
        dist.all_reduce(total, group=ctx.group)
    return total
