"""Held-out evaluation: ``data.eval`` documents, scored under the training layout.

The held-out documents are either a fixed fraction of ``data.source`` (chosen by the seed, so
the split depends only on the spec, never on the world size) or a separate ``data.eval.source``.
An evaluation cuts ``train.eval_tokens`` of them into the same fixed windows every time (a fresh
:class:`~seqshard.data.window.WindowBuilder`), scatters them with the run's own scatter (same
ShardPlan, same SP attention), and sums token losses under ``no_grad`` on every rank; one
all-reduce gives the global sum. Like the training loss, it is the same for every layout.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from seqshard.data.corpus import DataError, load_corpus
from seqshard.data.window import WindowBuilder
from seqshard.dist.guard import shared_failure

from .fsdp import equal_micro_batches
from .logs import get_logger

_EVAL_STREAM = 0x5EED_E7A1  # a fixed rng stream id for the held-out split


class CorpusView:
    """The documents ``indices`` of a corpus, with the Corpus interface the builders use."""

    def __init__(self, corpus, indices: np.ndarray):
        self.base, self.indices = corpus, np.asarray(indices, dtype=np.int64)
        self.lengths = corpus.lengths[self.indices]
        if hasattr(corpus, "source_ids"):  # a MixtureCorpus: tokens_by_source (data/mixture.py)
            self.source_ids, self.names = corpus.source_ids[self.indices], corpus.names

    def sampled_view(self, seed: int):
        return self  # one plain source (launch/sources_spec.py: data.eval.fraction needs one)

    def __len__(self):
        return len(self.indices)

    def tokens(self, i: int) -> torch.Tensor:
        return self.base.tokens(int(self.indices[int(i)]))

    def order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(self.indices))


def split_held_out(corpus, fraction: float, seed: int):
    """(train view, eval view): ``round(fraction * N)`` documents (at least 1) held out."""
    n = len(corpus)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise DataError(f"data.eval.fraction: {fraction} of {n} documents leaves no training documents; "
                        "lower the fraction or use more documents (data.max_documents)")
    held = np.random.default_rng([seed, _EVAL_STREAM]).permutation(n)[:n_eval]
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return CorpusView(corpus, np.flatnonzero(~mask)), CorpusView(corpus, np.flatnonzero(mask))


def _load_all(d, warn=None):
    from seqshard.data.mixture import load_mixture
    from seqshard.data.sources import eval_sources_of, sources_of

    train = load_mixture(sources_of(d), d, warn=warn)
    held = eval_sources_of(d)
    return train, (load_mixture(held, d, warn=warn, cap=False) if held else None)


def load_data(spec, rank: int):
    """(training corpus, held-out corpus or None). Rank 0 builds the datasets cache first and
    reports replaced bytes; a failure on any rank stops every rank with one line."""
    loaded = None
    with shared_failure("loading data"):
        if rank == 0:
            loaded = _load_all(spec.data, warn=get_logger(0).warning)
    with shared_failure("loading data"):
        if rank != 0:
            loaded = _load_all(spec.data)
        train, held = loaded
        if spec.data.eval.fraction:
            train, held = split_held_out(train, spec.data.eval.fraction, spec.seed)
    return train, held


def eval_due(spec, step: int, last: int) -> bool:
    """With held-out data: every ``train.eval_every`` steps and at the run's last step."""
    if not (spec.data.eval.fraction or spec.data.eval.source or spec.data.eval.sources):
        return False
    every = spec.train.eval_every
    return (every > 0 and step % every == 0) or step == last


def evaluate(run, held) -> dict:
    """Mean held-out token loss and perplexity of the current weights (every rank returns them),
    and ``eval_loss_by_source``: the mean loss of each held-out source's tokens (their counts in
    ``eval_loss_tokens_by_source``). Evaluation is unweighted: ``loss_weight`` shapes the training
    objective only (train/source_loss.py)."""
    from seqshard.data.mixture import SourceMetrics

    from .source_loss import SourceLoss

    spec = run.spec
    d = spec.data
    builder = SourceMetrics(WindowBuilder(held, d.max_seq_len, d.tokens_per_step, spec.seed))
    by_source = SourceLoss([1.0] * len(builder.names), builder.names)
    loss_tokens = dict.fromkeys(builder.names, 0)
    model = run.engine.model
    was_training = model.training
    model.eval()
    autocast = (torch.autocast(run.device.type, dtype=torch.bfloat16)
                if spec.train.dtype == "bfloat16" else nullcontext())
    loss_sum, n_tokens = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for _ in range(max(1, spec.train.eval_tokens // d.tokens_per_step)):
            batch = builder.next_batch()
            n_tokens += batch.num_loss_tokens
            for name, n in batch.stats["loss_tokens_by_source"].items():
                loss_tokens[name] += n
            local = list(run.scatter(batch))
            real = equal_micro_batches(run.engine, local, run.scatter.padding)  # fsdp2: all in every all-gather
            for (tokens, labels, positions, ctx, sources), counts in zip(local, real):
                with autocast:
                    loss = run.engine.forward(tokens.to(run.device), positions.to(run.device), ctx,
                                              labels.to(run.device))
                if counts:
                    loss_sum += loss.double().cpu()
                    by_source.add(model, labels, sources)
    sums = torch.cat([loss_sum.reshape(1), by_source.sums])
    dist.all_reduce(sums)
    model.train(was_training)
    mean = sums[0].item() / n_tokens
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 700.0)), "eval_tokens": n_tokens,
            "eval_loss_by_source": by_source.by_source(sums[1:], loss_tokens), "eval_loss_tokens_by_source": loss_tokens}


def checkpoint_dir(output_dir, step: int | None):
    """``checkpoints/step_<step>`` (complete), or the newest complete one; None if there is none."""
    from seqshard.dist.checkpoint import MARKER, checkpoint_root, latest_checkpoint

    if step is None:
        return latest_checkpoint(output_dir)
    path = checkpoint_root(output_dir) / f"step_{step}"
    return path if (path / MARKER).is_file() else None


def evaluate_checkpoint(spec, path) -> dict:
    """Load checkpoint ``path`` into the spec's layout and evaluate it on the held-out data."""
    from .trainer import setup

    run = setup(spec)
    state = run.engine.load(path)
    return {"step": state["step"], **evaluate(run, run.held_out)}
