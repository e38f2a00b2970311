"""The batch-builder seam: how a step's global batch is described, whatever built it.

A builder (window, pack, decompose) turns documents into a :class:`StepBatch` per optimizer step:
a list of :class:`Row` s, each a packed sequence of whole documents or document pieces with
their lengths. The trainer assigns rows to data-parallel replicas and packs each replica's rows
into micro-batches; every row keeps its document boundaries, so no token attends across
documents (DESIGN.md invariant 5). A builder's output depends only on the seed, the data
settings and the step, never on the world size (invariant 3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Row:
    """One packed sequence: ``tokens``/``labels``/``positions`` are ``[L]`` int64 tensors.

    ``doc_lens`` sums to L; ``positions`` restart at 0 at every document start; ``labels`` is the
    next token inside the same document and -100 where there is none (last token of a piece) or
    where that token carries no loss (a chat document's non-assistant tokens, data/chat.py).
    """
    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    doc_lens: list[int]
    docs: list[int] | None = None  # the corpus document of each segment (data/mixture.py metrics)
    sources: torch.Tensor | None = None  # [L] int64: each token's source index (data/mixture.py SourceMetrics)

    def __len__(self):
        return int(self.tokens.shape[0])


@dataclass
class StepBatch:
    rows: list[Row]
    stats: dict = field(default_factory=dict)  # per-step metrics the builder adds

    @property
    def num_tokens(self):
        return sum(len(r) for r in self.rows)

    @property
    def num_loss_tokens(self):
        return sum(int((r.labels != -100).sum()) for r in self.rows)


class BatchBuilder(Protocol):
    def next_batch(self) -> StepBatch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def make_row(pieces: list[torch.Tensor], docs=None, starts=None) -> Row:
    """Build a row from document pieces (each an int64 tensor of token ids, length >= 1).
    ``docs``: each piece's document index; ``starts``: each piece's first position id (its
    offset in its document, ``data.continue_positions``; default 0: positions restart)."""
    signed = torch.cat(pieces)  # chat / prompt_completion: non-target tokens stored as -(id + 1) (data/chat.py)
    tokens = torch.where(signed < 0, -signed - 1, signed)
    labels = torch.cat([torch.cat([torch.where(p[1:] < 0, -100, p[1:]), p.new_full((1,), -100)]) for p in pieces])
    starts = starts or [0] * len(pieces)
    positions = torch.cat([torch.arange(s, s + len(p), dtype=torch.int64) for p, s in zip(pieces, starts)])
    return Row(tokens, labels, positions, [int(len(p)) for p in pieces], None if docs is None else list(docs))
