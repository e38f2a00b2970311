"""The ``pack`` and ``decompose`` batch builders (``data.batching``), behind the seam of
:mod:`seqshard.data.batches`.

Both read a corpus with ``lengths`` (np.int64, BOS and EOS included) and ``tokens(i)`` (the ids of
document i), and their output depends only on the seed, the data settings and the step
(DESIGN.md invariant 3). Every row keeps its document boundaries (invariant 5).

Per-step ``StepBatch.stats``:
- ``pad_fraction``: capacity not filled, ``1 - tokens / (rows_per_step * max_seq_len)``;
- ``seq_len_mean`` / ``seq_len_max``: over the documents or pieces (the attention segments);
- ``attention_flops``: ``2 * sum_i L_i^2`` over those segments: causal attention per layer and
  per unit of head dim (QK^T and PV each take ``L^2 / 2`` multiply-adds of 2 FLOPs per unit of
  head dim), the measure the window builder reports too.
"""
from __future__ import annotations

import numpy as np
import torch

from seqshard.parallel.decompose import decompose
from seqshard.parallel.packing import pack_pieces, split_pieces

from .batches import StepBatch, make_row
from .curriculum import CurriculumSampler


def segment_stats(seg_lens, rows: int, capacity: int) -> dict:
    """The per-step stats of the module doc, for attention segments ``seg_lens``."""
    lens = np.asarray(seg_lens, dtype=np.int64)
    return {"pad_fraction": 1.0 - float(lens.sum()) / (rows * capacity),
            "seq_len_mean": float(lens.mean()), "seq_len_max": int(lens.max()),
            "attention_flops": 2 * int((lens * lens).sum())}


def _rows_per_step(tokens_per_step: int, max_seq_len: int) -> int:
    if tokens_per_step % max_seq_len:
        raise ValueError(f"data.tokens_per_step {tokens_per_step} must be a multiple of data.max_seq_len {max_seq_len}")
    return tokens_per_step // max_seq_len


class PackBuilder:
    """Whole documents in seed order (a fresh permutation every epoch), packed into rows.

    Each step tops a pool of pieces up to ``window * tokens_per_step`` tokens with the next
    documents (split into ``max_seq_len`` pieces when longer), packs the pool with ``method``
    (:func:`~seqshard.parallel.packing.pack_pieces`) and emits ``tokens_per_step // max_seq_len``
    bins as rows: bins holding a piece carried over from an earlier step first, fullest first
    within each kind. The other pieces carry over and are repacked with the next documents, so a
    bin left half-empty fills up before it goes out, and carried pieces go out first. ``restart_positions=False`` continues a split
    document's position ids across its pieces. State: the stream position and the carried pieces.
    """

    def __init__(self, corpus, max_seq_len: int, tokens_per_step: int, method: str = "bfd", seed: int = 0,
                 *, window: int = 4, restart_positions: bool = True):
        self.rows_per_step = _rows_per_step(tokens_per_step, max_seq_len)
        if int(np.sum(corpus.lengths)) == 0:
            raise ValueError("data.source holds no tokens to pack")
        self.corpus, self.capacity, self.method, self.seed = corpus, max_seq_len, method, seed
        self.window, self.restart_positions = window, restart_positions
        self.epoch, self.cursor = 0, 0
        self.carry = np.zeros((0, 4), np.int64)  # pieces waiting: (doc, start, length, steps waited)
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if hasattr(self.corpus, "order"):  # a permutation; a mixture's weighted draws (data/mixture.py)
            return self.corpus.order(self.seed, epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.corpus.lengths))

    def _next_document(self) -> int:
        doc = int(self._order[self.cursor])
        self.cursor += 1
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        return doc

    def _fill_pool(self) -> np.ndarray:
        """Carried pieces plus new documents until the pieces shorter than a row (the ones that
        need packing) hold ``window * tokens_per_step`` tokens, or the full-row pieces alone fill
        that many rows (a document longer than the window enters the pool once, as index ranges)."""
        def short_tokens(pieces):
            return int(pieces[pieces[:, 2] < self.capacity, 2].sum())

        target = self.window * self.rows_per_step * self.capacity
        pool, short = [self.carry], short_tokens(self.carry)
        full = int(self.carry[:, 2].sum()) - short
        while short < target and full < target:
            doc = self._next_document()
            length = int(self.corpus.lengths[doc])
            if length == 0:
                continue
            pieces = split_pieces([length], self.capacity)
            pieces[:, 0] = doc
            pool.append(np.concatenate([pieces, np.zeros((len(pieces), 1), np.int64)], axis=1))
            tail = short_tokens(pieces)
            short, full = short + tail, full + length - tail
        return np.concatenate(pool)

    def _choose_bins(self, pool, result) -> list[int]:
        load = result.bin_lengths()
        if len(load) == 0:
            return []
        waited = np.maximum.reduceat(pool[result.order, 3], result.offsets[:-1])  # per bin, vectorized
        order = np.lexsort((np.arange(len(load)), -load, -waited))  # oldest, then fullest, then first
        return sorted(order[:self.rows_per_step].tolist())

    def _row(self, pieces, cache):
        tensors = []
        for doc, start, length in pieces.tolist():
            if doc not in cache:
                cache[doc] = self.corpus.tokens(doc)
            tensors.append(cache[doc][start:start + length])
        row = make_row(tensors, pieces[:, 0].tolist())
        if not self.restart_positions:
            row.positions += torch.repeat_interleave(torch.as_tensor(pieces[:, 1]), torch.as_tensor(pieces[:, 2]))
        return row

    def next_batch(self) -> StepBatch:
        pool = self._fill_pool()
        result = pack_pieces(pool[:, 2], self.capacity, self.method, seed=self.seed, priority=pool[:, 3])
        chosen = self._choose_bins(pool, result)
        emitted = np.zeros(len(pool), bool)
        rows, cache = [], {}
        for b in chosen:
            ids = result.order[result.offsets[b]:result.offsets[b + 1]]
            emitted[ids] = True
            rows.append(self._row(pool[ids, :3], cache))
        self.carry = pool[~emitted]
        self.carry[:, 3] += 1
        return StepBatch(rows, segment_stats(pool[emitted, 2], self.rows_per_step, self.capacity))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "carry": self.carry.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.carry = np.array(state["carry"], dtype=np.int64).reshape(-1, 4)
        self._order = self._epoch_order(self.epoch)


class DecomposeBuilder:
    """Rows are power-of-two chunks of one bucket per step (Pouransari et al. 2024).

    The corpus is decomposed once (:func:`~seqshard.parallel.decompose.decompose` with
    ``max_seq_len`` / ``min_seq_len``, shorter tails dropped); each step the
    :class:`~seqshard.data.curriculum.CurriculumSampler` picks a bucket of chunk length L by the
    ``schedule`` and ``cycles`` over ``total_steps``, and the step holds ``tokens_per_step // L``
    rows of one chunk each: no padding, one document per row. State: the sampler's.
    """

    def __init__(self, corpus, max_seq_len: int, min_seq_len: int, tokens_per_step: int,
                 schedule: str = "uniform", cycles: int = 1, total_steps: int = 1, seed: int = 0,
                 continue_positions: bool = False):
        _rows_per_step(tokens_per_step, max_seq_len)
        self.corpus, self.tokens_per_step, self.continue_positions = corpus, tokens_per_step, continue_positions
        self.buckets = decompose(corpus.lengths, max_seq_len, min_seq_len)
        sizes = {n: len(chunks) for n, chunks in self.buckets.items()}
        self.sampler = CurriculumSampler(sizes, tokens_per_step, schedule, cycles, total_steps, seed)

    def next_batch(self) -> StepBatch:
        length, ids = self.sampler.next()
        chunks = self.buckets[length][ids]
        rows, cache = [], {}
        for doc, start, n in chunks.tolist():
            if doc not in cache:
                cache[doc] = self.corpus.tokens(doc)
            rows.append(make_row([cache[doc][start:start + n]], [doc], [start if self.continue_positions else 0]))
        return StepBatch(rows, segment_stats(chunks[:, 2], len(rows), length))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
