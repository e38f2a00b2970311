"""Mixture-of-experts MLP and the router load-balancing loss (single-device code, no torch.distributed).

:class:`MoE` replaces a block's SwiGLU MLP: a top-k router (softmax or sigmoid scores, the k chosen
scores renormalised where the family does it: Mixtral, MiniMax, Qwen3-MoE with ``norm_topk_prob``),
SwiGLU experts stored as ``[E, 2F, D]`` / ``[E, D, F]`` tensors and run as two batched matmuls over
the token-expert assignments grouped by expert (padded to the busiest expert's count: no Python
loop over tokens or experts), and an optional always-on shared expert.

Load-balancing loss (Switch Transformer eq. 4-6, as transformers' ``load_balancing_loss_func``
computes it): over the rows ``N = tokens x MoE layers`` of a sequence, with ``C_e`` the number of
top-k assignments to expert ``e`` and ``P_e`` the summed router probability of ``e`` (both summed
over tokens *and* layers, as transformers concatenates the layers' router logits),
``aux = E * sum_e (C_e / N) (P_e / N)``. transformers computes it over the whole forward batch; a
packed seqshard micro-batch holds many documents, and transformers on one document at a time is the
reference, so seqshard computes ``aux_d`` **per document** and adds
``aux_loss_coef * sum_d w_d aux_d`` to the summed token loss, ``w_d`` the document's loss-token
count (with per-source ``loss_weight``: the sum of its loss tokens' weights, and the trainer divides
by the step's weight sum, so the aux term keeps its ratio to each document's cross-entropy). After
the trainer's division by the step's global loss-token count the loss is
``mean CE + coef * (loss-token-weighted mean of aux_d)``: for one unpadded sequence exactly
transformers' ``loss`` (with ``output_router_logits``), and independent of dp x sp and of
micro-batching, since documents are never split across micro-batches and a document split over
SP ranks gets its counts ``C_d``, ``N_d``, ``w_d`` summed over the group (``doc_reduce_fn``, installed
by ``parallelize()``), while each rank differentiates only its own ``P_d`` (the gradient of the
sum over ranks is the exact gradient, since ``C`` is piecewise constant). A step-global aux loss
(one ``C`` over all documents of the step) would also be layout-independent, but its gradient needs
the step's counts before the first micro-batch's backward: an extra forward pass, or every
micro-batch's graph kept alive; the per-document loss needs neither and matches transformers on each
document.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .llama import Decoder, SwiGLU


class Router(nn.Module):
    def __init__(self, dim, num_experts, top_k, score="softmax", norm_topk=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.top_k, self.score, self.norm_topk = top_k, score, norm_topk

    def forward(self, x):
        """x ``[T, D]`` -> scores ``[T, E]`` (fp32), top-k weights ``[T, k]`` (x's dtype), indices ``[T, k]``."""
        logits = F.linear(x, self.weight).float()
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        top_w, top_i = scores.topk(self.top_k, dim=-1)
        if self.norm_topk:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        return scores, top_w.to(x.dtype), top_i


class Experts(nn.Module):
    """E SwiGLU experts: ``gate_up`` ``[E, 2F, D]`` (gate rows first), ``down`` ``[E, D, F]``."""

    def __init__(self, dim, hidden, num_experts):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def forward(self, x, top_i, top_w):
        """``sum_j top_w[t, j] * expert_{top_i[t, j]}(x_t)`` for every token t."""
        t, k = top_i.shape
        flat = top_i.reshape(-1)  # [T*k] expert of each assignment
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        token = order // k
        out = self.grouped(x[token], flat[order])
        weighted = out * top_w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add(0, token, weighted)

    def apply_rows(self, rows, expert):
        """Rows ``[N, D]`` in any order, each through its expert ``expert[N]`` (an index into this
        module's experts) -> ``[N, D]`` in the same order (expert parallelism: parallel/ep.py)."""
        order = torch.argsort(expert, stable=True)
        return torch.zeros_like(rows).index_copy(0, order, self.grouped(rows[order], expert[order]))

    def grouped(self, rows, expert):
        """Rows ``[N, D]`` already grouped by ``expert`` (non-decreasing) through their experts: two
        batched matmuls over ``[E, capacity, D]``, capacity the busiest expert's row count."""
        n, num_experts = len(expert), self.gate_up.shape[0]
        counts = torch.bincount(expert, minlength=num_experts)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n, device=rows.device) - starts[expert]
        capacity = int(counts.max()) if n else 0
        # [N, D] -> [E, capacity, D], zero rows where an expert has fewer assignments
        grouped = rows.new_zeros(num_experts, capacity, rows.shape[1]).index_put((expert, slot), rows)
        gate, up = torch.bmm(grouped, self.gate_up.transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, self.down.transpose(1, 2))  # [E, capacity, D]
        return out[expert, slot]


class MoE(nn.Module):
    """Router + experts (+ shared expert). While ``route_log`` is a list, each forward appends its
    ``(scores [T, E] fp32, top-k indices [T, k])`` for the decoder's load-balancing loss. ``expert_fn``
    (None: every expert here) is what expert parallelism installs (parallel/ep.py):
    ``expert_fn(experts, x, top_i, top_w)`` with the same result as ``experts(x, top_i, top_w)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.router = Router(cfg.dim, m.num_experts, m.top_k, m.score, m.norm_topk)
        self.experts = Experts(cfg.dim, m.expert_ffn_dim or cfg.ffn_dim, m.num_experts)
        if m.shared_expert_ffn_dim:
            self.shared = SwiGLU(cfg.dim, m.shared_expert_ffn_dim)
        self.route_log = None
        self.expert_fn = None

    def forward(self, x):
        scores, top_w, top_i = self.router(x)
        if self.route_log is not None:
            self.route_log.append((scores, top_i))
        y = self.experts(x, top_i, top_w) if self.expert_fn is None else self.expert_fn(self.experts, x, top_i, top_w)
        return y + self.shared(x) if hasattr(self, "shared") else y


def is_moe_layer(cfg: ModelConfig, index: int) -> bool:
    return cfg.moe.num_experts > 0 and (not cfg.moe.layers or cfg.moe.layers[index] == "E")


def varlen_doc_sums(x, ctx):
    """Per-document sums of per-token rows on one device: x ``[T, F]`` -> ``[N_docs, F]``."""
    cu = ctx.cu_seqlens.long()
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=x.device), cu[1:] - cu[:-1])
    return x.new_zeros(len(cu) - 1, x.shape[1]).index_add(0, doc, x[:cu[-1]])


def no_reduce(doc_sums, ctx):
    return doc_sums


def load_balancing_terms(log, labels, ctx, doc_sums_fn, doc_reduce_fn, weights=None):
    """(sum_d w_d aux_d on this rank, expert load ``[layers, E]`` of this rank's real tokens).

    ``log``: the MoE layers' ``(scores, top_i)``. Counts, token and loss-token numbers are summed
    per document and over the SP group (no gradient); the probabilities only locally. ``w_d`` is
    the document's loss-token count, or with per-token loss ``weights`` the sum of its loss
    tokens' weights (every token of a document has its source's weight)."""
    num_experts = log[0][0].shape[1]
    with torch.no_grad():
        counts = torch.cat([F.one_hot(i, num_experts).sum(1) for _, i in log], dim=1).float()  # [T, L*E]
        ones = torch.ones(len(labels), 1, device=labels.device)
        target = (labels != -100).float()
        if weights is not None:
            target = target * weights.to(target.dtype)
        feats = torch.cat([counts, ones, target[:, None]], dim=1)
        local = doc_sums_fn(feats, ctx)  # [D, L*E + 2]
        total = doc_reduce_fn(local, ctx)
        c = total[:, :-2].view(len(total), len(log), num_experts).sum(1)  # [D, E]
        rows, weight = total[:, -2] * len(log), total[:, -1]
        load = local[:, :-2].sum(0).view(len(log), num_experts)
    probs = doc_sums_fn(torch.stack([s for s, _ in log]).sum(0), ctx)  # [D, E], differentiable
    aux = num_experts * (c * probs).sum(-1) / rows.clamp_min(1) ** 2
    return (weight * aux).sum(), load


class MoEDecoder(Decoder):
    """A Decoder whose MLPs are :class:`MoE` where ``cfg.moe.layers`` says; with labels, in training
    mode, it returns the summed token loss plus ``aux_loss_coef * sum_d w_d aux_d`` and keeps, in
    ``moe_metrics``, this rank's uncoefficiented ``aux_sum`` and per-layer expert ``load`` (detached)
    for the trainer. In eval mode (held-out evaluation) it returns the summed token loss only."""

    def __init__(self, cfg: ModelConfig, mixers):
        self.doc_sums_fn, self.doc_reduce_fn = varlen_doc_sums, no_reduce
        super().__init__(cfg, mixers)
        self.moe_metrics = None

    def make_block(self, cfg, mixer, index):
        block = super().make_block(cfg, mixer, index)
        if is_moe_layer(cfg, index):
            block.mlp = MoE(cfg)
        return block

    def reset_parameters(self):
        super().reset_parameters()
        for name, p in self.named_parameters():  # expert down projections: residual std, like w2
            if name.endswith("experts.down"):
                nn.init.normal_(p, std=0.02 / len(self.layers) ** 0.5 / 2 ** 0.5)

    def moe_modules(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, tokens, positions, ctx, labels=None, weights=None):
        moes = self.moe_modules()
        if labels is None or not moes or not self.training:  # evaluation: the token loss only
            return super().forward(tokens, positions, ctx, labels, weights)
        log = []
        for m in moes:
            m.route_log = log
        try:
            h = self.hidden(tokens, positions, ctx)
        finally:
            for m in moes:
                m.route_log = None
        loss = self.lm_head(h, labels, weights)
        aux_sum, load = load_balancing_terms(log, labels, ctx, self.doc_sums_fn, self.doc_reduce_fn, weights)
        self.moe_metrics = {"aux_sum": aux_sum.detach(), "load": load}
        return loss + self.cfg.moe.aux_loss_coef * aux_sum.to(loss.dtype)


def build_moe_llama(cfg: ModelConfig) -> MoEDecoder:
    from .llama import Attention

    return MoEDecoder(cfg, [Attention(cfg, i) for i in range(cfg.n_layers)])


__all__ = ["MoE", "MoEDecoder", "Router", "Experts", "build_moe_llama", "load_balancing_terms"]
