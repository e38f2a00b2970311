"""Several weighted sources as one corpus, the long-document policy, and per-source step metrics.

:class:`MixtureCorpus` concatenates the sources' documents (document ``i`` of source ``s`` is
``offsets[s] + i``) and gives the builders the Corpus interface (``lengths``, ``tokens(i)``,
``order(seed, epoch)``). Its epoch order is a pure function of ``(seed, epoch)``, so a builder's
state (epoch, cursor, ...) resumes it exactly:

- each draw of the epoch picks source ``s`` with probability ``weight_s / sum(weights)``
  (i.i.d., seeded by ``(seed, epoch)``); the epoch has as many draws as one pass over every
  source holds documents (upsampled copies counted);
- the draws of source ``s`` take its documents in seeded random passes (one permutation per pass,
  as many passes as the draws need); in a pass, a document of at least ``upsample_long.min_len``
  tokens appears ``upsample_long.factor`` times, every other document once.

One source without upsampling keeps the plain per-epoch permutation of the documents (the order
seqshard always had). ``data.long_documents`` (a document longer than ``data.max_seq_len``):
``split`` keeps it whole and the builders cut it into pieces (each piece restarts its positions
unless ``data.continue_positions``), ``truncate`` keeps its first ``max_seq_len`` tokens, ``drop``
leaves it out.
"""
from __future__ import annotations

import numpy as np
import torch

from .batches import StepBatch
from .corpus import DataError, load_corpus

_MIX_STREAM = 0x313C_5EED  # rng stream id of the source draws


class IndexView:
    """Documents ``indices`` of ``corpus`` (truncated to ``max_len`` tokens when > 0)."""

    def __init__(self, corpus, indices, max_len: int = 0):
        self.base, self.indices, self.max_len = corpus, np.asarray(indices, dtype=np.int64), max_len
        lengths = corpus.lengths[self.indices]
        self.lengths = np.minimum(lengths, max_len) if max_len else lengths

    def __len__(self):
        return len(self.indices)

    def tokens(self, i: int) -> torch.Tensor:
        ids = self.base.tokens(int(self.indices[int(i)]))
        return ids[:self.max_len] if self.max_len else ids

    def order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(self.indices))


def apply_long_documents(corpus, policy: str, max_seq_len: int, where: str):
    """``data.long_documents`` on one source's corpus (module doc)."""
    if policy == "split":
        return corpus
    if policy == "truncate":
        return IndexView(corpus, np.arange(len(corpus.lengths)), max_seq_len)
    keep = np.flatnonzero(corpus.lengths <= max_seq_len)
    if len(keep) == 0:
        raise DataError(f"data.long_documents: drop leaves no document of {where} (every one is longer "
                        f"than data.max_seq_len {max_seq_len})")
    return IndexView(corpus, keep)


class MixtureCorpus:
    """The sources' documents, drawn by weight (module doc). ``source_ids[i]``: the source of
    document ``i``; ``names[s]``: the name of source ``s``."""

    def __init__(self, parts, weights, names, upsample):
        self.parts, self.names = list(parts), list(names)
        self.weights = np.asarray(weights, dtype=np.float64)
        sizes = [len(p.lengths) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.lengths = np.concatenate([p.lengths for p in self.parts]).astype(np.int64)
        self.source_ids = np.repeat(np.arange(len(self.parts)), sizes)
        # one pass over source s: its documents, long ones repeated factor times
        self.passes = [np.repeat(np.arange(len(p.lengths)), np.where(p.lengths >= up.min_len, up.factor, 1))
                       if up.factor > 1 else np.arange(len(p.lengths)) for p, up in zip(self.parts, upsample)]
        self.plain = len(self.parts) == 1 and len(self.passes[0]) == sizes[0]

    def __len__(self):
        return len(self.lengths)

    def tokens(self, i: int) -> torch.Tensor:
        s = int(self.source_ids[int(i)])
        return self.parts[s].tokens(int(i) - int(self.offsets[s]))

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The documents of an epoch, in order: a function of ``(seed, epoch)`` only."""
        if self.plain:
            return np.random.default_rng([seed, epoch]).permutation(len(self.lengths))
        draws = sum(len(p) for p in self.passes)
        picks = np.random.default_rng([seed, epoch, _MIX_STREAM]).choice(
            len(self.parts), size=draws, p=self.weights / self.weights.sum())
        order = np.empty(draws, dtype=np.int64)
        for s, one_pass in enumerate(self.passes):
            where = np.flatnonzero(picks == s)
            n_passes = -(-len(where) // len(one_pass))
            stream = [one_pass[np.random.default_rng([seed, epoch, _MIX_STREAM, s, k]).permutation(len(one_pass))]
                      for k in range(n_passes)]
            order[where] = self.offsets[s] + (np.concatenate(stream)[:len(where)] if stream else [])
        return order

    def sampled_view(self, seed: int):
        """The documents of epoch 0's draws as a corpus (for builders that read every document
        once, like ``decompose``); the mixture itself when it is one plain source."""
        return self if self.plain else _SampledView(self, self.order(seed, 0))


class _SampledView(IndexView):
    def __init__(self, mixture, indices):
        super().__init__(mixture, indices)
        self.source_ids, self.names = mixture.source_ids[self.indices], mixture.names


def load_mixture(sources, d, warn=None, cap: bool = True) -> MixtureCorpus:
    """Load every source (data/corpus.py ``load_corpus``) under ``d``'s tokenizer, cache and
    long-document policy; ``cap``: apply ``data.max_documents`` per source."""
    parts = []
    for i, src in enumerate(sources):
        corpus = load_corpus(src.source, src.text_field, d.cache_dir or None,
                             (d.max_documents or None) if cap else None, warn=warn, tokenizer=d.tokenizer,
                             split=src.split, num_proc=d.num_proc, progress=warn is not None, fmt=src.format,
                             loss_on=src.loss_on)
        parts.append(apply_long_documents(corpus, d.long_documents, d.max_seq_len, src.source))
    return MixtureCorpus(parts, [s.weight for s in sources], [s.name or str(i) for i, s in enumerate(sources)],
                         [s.upsample_long for s in sources])


class SourceMetrics:
    """Wraps a batch builder (over a corpus with ``source_ids`` and ``names``; a plain Corpus is one
    source ``"0"``): each row gains ``sources`` (every token's source index, for per-source loss
    weights and losses) and each step's stats gain ``tokens_by_source`` (``{name: tokens}``) and
    ``loss_tokens_by_source`` (``{name: tokens that carry loss}``), every source named, pieces
    counted where they land. State is the inner builder's."""

    def __init__(self, builder):
        self.builder, self.corpus = builder, builder.corpus  # the corpus the rows' docs index
        self.names = list(getattr(self.corpus, "names", ["0"]))

    def next_batch(self) -> StepBatch:
        batch = self.builder.next_batch()
        ids = getattr(self.corpus, "source_ids", None)
        counts = np.zeros(len(self.names), dtype=np.int64)
        loss_counts = torch.zeros(len(self.names), dtype=torch.int64)
        for row in batch.rows:
            docs = np.asarray(row.docs, dtype=np.int64)
            per_segment = ids[docs] if ids is not None else np.zeros(len(docs), dtype=np.int64)
            np.add.at(counts, per_segment, row.doc_lens)
            row.sources = torch.repeat_interleave(torch.from_numpy(per_segment.astype(np.int64)),
                                                  torch.tensor(row.doc_lens, dtype=torch.int64))
            loss_counts += torch.bincount(row.sources[row.labels != -100], minlength=len(self.names))
        batch.stats["tokens_by_source"] = dict(zip(self.names, counts.tolist()))
        batch.stats["loss_tokens_by_source"] = dict(zip(self.names, loss_counts.tolist()))
        return batch

    def state_dict(self) -> dict:
        return self.builder.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.builder.load_state_dict(state)
