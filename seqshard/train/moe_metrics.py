"""Step metrics of mixture-of-experts models: ``aux_loss`` and ``expert_load``.

``aux_loss``: the load-balancing loss the step trained on, without its coefficient, with the
semantics of the main loss (models/moe.py): ``sum_d w_d aux_d`` over the step's documents on every
rank, divided by the step's global loss-token count (with per-source loss weights: the step's
weight sum, train/source_loss.py). ``expert_load``: per MoE layer, the fraction
of the step's top-k assignments each expert received. One all-reduce per step, on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqshard.dist.comm_stats import record


class MoEMetrics:
    def __init__(self, model):
        self.decoder = next((m for m in model.modules() if hasattr(m, "moe_metrics")), None)
        self.aux, self.load = torch.zeros((), dtype=torch.float64), None

    def add(self, real: bool):
        """After a micro-batch's forward: take its statistics (padding micro-batches add nothing)."""
        stats = None if self.decoder is None else self.decoder.moe_metrics
        if stats is None or not real:
            return
        self.aux += stats["aux_sum"].double().cpu()
        load = stats["load"].double().cpu()
        self.load = load if self.load is None else self.load + load

    def finish(self, denominator) -> dict:
        """``denominator``: the main loss's (loss-token count or weight sum)."""
        if self.decoder is None or not self.decoder.moe_modules():
            return {}
        if self.load is None:  # no real micro-batch on this rank: zeros of the right shape
            moes = self.decoder.moe_modules()
            self.load = torch.zeros(len(moes), self.decoder.cfg.moe.num_experts, dtype=torch.float64)
        flat = torch.cat([self.aux.reshape(1), self.load.reshape(-1)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            with record("all_reduce.moe_metrics", flat.numel() * 8):
                dist.all_reduce(flat)
        load = flat[1:].view_as(self.load)
        fractions = load / load.sum(-1, keepdim=True).clamp_min(1)
        return {"aux_loss": flat[0].item() / (denominator if denominator > 0 else 1),
                "expert_load": fractions.tolist()}
