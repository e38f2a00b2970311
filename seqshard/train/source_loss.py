"""Per-source loss weights (``loss_weight``) and per-source losses of a step (docs/data.md).

Every token carries the source of its document (``Row.sources``, data/mixture.py). With ``w_s``
the ``loss_weight`` of source ``s`` and ``ce_t`` the cross-entropy of loss token ``t``, a training
step's loss is

    loss = sum_t w_s(t) ce_t / sum_t w_s(t)

over every loss token of the *global* step (all micro-batches, all dp and sp ranks). The
denominator is known from the step's global batch, which every rank builds (DESIGN.md invariant
3), so each micro-batch's weighted sum is divided by it before its backward and the gradients
summed over ranks are the exact gradient of that loss, whatever the layout. Only the ratios of
the weights matter (all weights ``c`` give the plain mean); with every weight 1.0 nothing is
weighted and the step is the unweighted one bit for bit (``loss = sum_t ce_t / loss tokens``).

``loss_by_source``: per source name, the *unweighted* mean cross-entropy of that source's loss
tokens in the step (global, layout-independent), ``None`` for a source without loss tokens in the
step; ``loss_tokens_by_source`` (from the batch) holds the counts. The per-token cross-entropy
comes from the model's ``token_losses`` after each labelled forward (models/llama.py LMHead,
models/hf_wrap.py).
"""
from __future__ import annotations

import torch


def loss_weights_of(spec) -> list[float]:
    """Each training source's ``loss_weight``, in source-index order."""
    from seqshard.data.sources import sources_of

    return [float(s.loss_weight) for s in sources_of(spec.data)]


class SourceLoss:
    """A step's per-token weights, its loss denominator and its per-source loss sums."""

    def __init__(self, weights, names, input_dtype=None):
        """``input_dtype``: the dtype the engine casts floating forward inputs to (fsdp2 in
        bfloat16): the weights are rounded to it here too, so the denominator sums the weights
        the loss applied."""
        self.names = list(names)
        weights = list(weights)
        assert len(weights) == len(self.names), (weights, self.names)
        self.table = None if all(w == 1.0 for w in weights) else torch.tensor(weights, dtype=torch.float64)
        if self.table is not None and input_dtype is not None:
            self.table = self.table.to(input_dtype).double()
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)

    @property
    def weighted(self) -> bool:
        return self.table is not None

    def start(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)

    def denominator(self, batch):
        """The step's loss-token count, or with weights the sum of its loss tokens' weights."""
        if self.table is None:
            return batch.num_loss_tokens
        total = torch.zeros((), dtype=torch.float64)
        for row in batch.rows:
            total += self.table[row.sources[row.labels != -100]].sum()
        return float(total)

    def token_weights(self, labels, sources, device):
        """The forward's per-token weights (None: unweighted). Shard padding (-1) weighs 0."""
        if self.table is None:
            return None
        if sources is None:
            if bool((labels != -100).any()):
                raise RuntimeError("per-source loss weights need each token's source; this micro-batch has none")
            return None
        w = torch.where(sources >= 0, self.table.float()[sources.clamp_min(0)], 0.0)
        return w.to(device)

    def add(self, model, labels, sources) -> None:
        """After a real micro-batch's forward: add its per-token losses to their sources' sums."""
        losses = getattr(model, "token_losses", None)
        if sources is None:
            return
        if losses is None:
            raise RuntimeError(f"{type(model).__name__} keeps no token_losses: loss_by_source cannot be computed")
        keep = (labels != -100) & (sources >= 0)
        self.sums.index_add_(0, sources[keep], losses.detach().cpu().double()[keep])

    def by_source(self, sums, loss_tokens: dict) -> dict:
        """``{name: mean unweighted loss}`` from the sums over all ranks."""
        return {n: (float(sums[i]) / loss_tokens[n] if loss_tokens.get(n) else None)
                for i, n in enumerate(self.names)}
