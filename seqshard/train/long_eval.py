"""Long-context evaluation: loss by position and passkey retrieval, under the run's own layout.

Both score held-out rows of one document each (``positions`` 0..L-1) through the run's scatter,
so a row of L tokens is sharded over the SP group exactly as training shards it, and L can be
longer than one rank could hold. A forward hook on the LM head (inside the forward, where fsdp2
has the head's weight gathered) turns each rank's final hidden states into per-token losses and
argmax hits, chunk by chunk (:func:`token_scores`: no ``[T, vocab]`` tensor beyond one chunk).
Each rank adds its tokens into per-bucket (or per-row) sums; one all-reduce of those sums makes
the result independent of the layout (DESIGN.md invariant 3).

- **Loss by position**: the first ``max_len`` tokens of ``documents`` held-out documents at
  least that long (chosen by the seed). Position ``p`` is the 0-based index of the token whose
  successor is predicted, so the model sees ``p + 1`` tokens of context; a bucket
  ``[start, end)`` averages the losses of those positions (positions ``0 .. max_len - 2``).
- **Passkey retrieval** (needle in a haystack, Mohtashami & Jaggi 2023): a random 5-digit key
  in a sentence placed at ``depth`` (0 = right after BOS, 1 = just before the question) of held-out
  text, then ``What is the pass key? The pass key is`` and the key. Teacher-forced, no sampling:
  a trial is correct when every key token is the model's argmax given the true prefix (greedy
  decoding would write the key); ``key_prob`` is the model's probability of the exact key.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from seqshard.data.batches import Row, StepBatch, make_row

from .fsdp import equal_micro_batches

_LONG_STREAM = 0x10_E7A1  # rng stream ids: document choice, passkey haystacks and keys
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


class LongEvalError(ValueError):
    """Held-out data that cannot give the asked rows; ``path`` names the flag or key to change.
    Found before the first step, the same on every rank: the CLI exits 2."""

    exit_code = 2

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# ---- rows (pure: the same on every rank, for every layout) -------------------------------------

def bucket_edges(max_len: int, bucket: int) -> list[tuple[int, int]]:
    """``[start, end)`` buckets covering the scored positions ``0 .. max_len - 2``."""
    scored = max_len - 1
    return [(s, min(s + bucket, scored)) for s in range(0, scored, bucket)]


def long_documents(corpus, min_len: int, count: int, seed: int) -> list[int]:
    """Up to ``count`` document indices with at least ``min_len`` tokens, in a seeded order."""
    order = np.random.default_rng([seed, _LONG_STREAM]).permutation(len(corpus))
    long = [int(i) for i in order if corpus.lengths[i] >= min_len]
    return long[:count]


def position_rows(corpus, max_len: int, documents: int, seed: int, path: str = "--max-len") -> list[Row]:
    """One row per chosen held-out document: its first ``max_len`` tokens."""
    ids = long_documents(corpus, max_len, documents, seed)
    if not ids:
        longest = int(np.max(corpus.lengths)) if len(corpus) else 0
        raise LongEvalError(path, f"no held-out document has {max_len} tokens (the longest has {longest}); "
                            "lower it or hold out longer documents (data.eval.source)")
    return [make_row([corpus.tokens(i)[:max_len]]) for i in ids]


def _plain(tokenizer, text: str) -> list[int]:
    """``text``'s token ids without the BOS/EOS that ``encode`` adds to a document."""
    ids = tokenizer.encode(text)
    if ids and tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    if ids and tokenizer.eos_id is not None and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return ids


def passkey_overhead(tokenizer) -> int:
    """Tokens of a passkey row that are not haystack (BOS, needle, question, answer; longest key)."""
    key = "99999"
    return (1 + len(_plain(tokenizer, NEEDLE.format(key=key))) + len(_plain(tokenizer, QUESTION))
            + len(_plain(tokenizer, ANSWER.format(key=key))))


def _haystack(corpus, n: int, rng, specials) -> torch.Tensor:
    """``n`` held-out tokens from a random document onwards (documents joined, BOS/EOS dropped)."""
    parts, have, i = [], 0, int(rng.integers(len(corpus)))
    for _ in range(len(corpus)):
        t = corpus.tokens(i)
        t = torch.where(t < 0, -t - 1, t)  # a chat document's non-target tokens are stored signed (data/chat.py)
        t = t[~torch.isin(t, specials)]
        parts.append(t)
        have += len(t)
        if have >= n:
            break
        i = (i + 1) % len(corpus)
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    if len(stream) < n:
        raise LongEvalError("passkey", f"the held-out documents hold {len(stream)} tokens, fewer than the "
                            f"{n} a haystack needs")
    return stream[:n]


def passkey_rows(corpus, tokenizer, lengths, depths, trials: int, seed: int):
    """Rows of exactly ``length`` tokens with labels only on the key; returns (rows, cells) with
    ``cells[i] = (length, depth)`` of row i."""
    specials = torch.tensor([x for x in (tokenizer.bos_id, tokenizer.eos_id) if x is not None] or [-1])
    rows, cells = [], []
    for length in lengths:
        for di, depth in enumerate(depths):
            for trial in range(trials):
                rng = np.random.default_rng([seed, _LONG_STREAM, int(length), di, trial])
                key = str(int(rng.integers(10_000, 100_000)))
                needle, question, answer = (torch.tensor(_plain(tokenizer, t.format(key=key)), dtype=torch.int64)
                                            for t in (NEEDLE, QUESTION, ANSWER))
                bos = torch.tensor([tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id])
                n = int(length) - 1 - len(needle) - len(question) - len(answer)
                if n < 1:
                    raise LongEvalError("passkey", f"length {length} leaves no haystack (needle, question "
                                        f"and key take {int(length) - n - 1} tokens)")
                hay = _haystack(corpus, n, rng, specials)
                at = round(float(depth) * n)
                tokens = torch.cat([bos, hay[:at], needle, hay[at:], question, answer])
                row = make_row([tokens])
                keep = torch.zeros(len(tokens), dtype=torch.bool)
                keep[len(tokens) - len(answer) - 1:len(tokens) - 1] = True  # positions predicting the key
                row.labels = torch.where(keep, row.labels, torch.full_like(row.labels, -100))
                rows.append(row)
                cells.append((int(length), float(depth)))
    return rows, cells


# ---- scoring ------------------------------------------------------------------------------------

def _chunk_rows(vocab: int, budget_bytes: int = 64 * 2**20) -> int:
    return max(1, budget_bytes // (4 * max(1, vocab)))


def token_scores(hidden, weight, labels, chunk: int | None = None):
    """Per-token cross-entropy (fp32) and argmax hit of ``hidden @ weight.T`` against ``labels``
    (all valid), one ``[chunk, vocab]`` logits block at a time. hidden ``[n, D]``, weight ``[V, D]``."""
    chunk = chunk or _chunk_rows(weight.shape[0])
    w = weight.float()
    losses, hits = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = hidden[start:start + chunk].float() @ w.t()  # [chunk, V]
        target = labels[start:start + chunk]
        picked = logits.gather(1, target[:, None])[:, 0]
        losses.append(torch.logsumexp(logits, dim=-1) - picked)
        hits.append(logits.argmax(dim=-1) == target)
    if not losses:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return torch.cat(losses), torch.cat(hits)


class _Capture:
    labels: torch.Tensor = None
    scores: tuple = None


def _head_hook(model):
    """(box, module, hook): ``hook`` on ``module`` scores the hidden states reaching the LM head inside
    the forward against ``box.labels`` and leaves ``(losses, hits)`` in ``box.scores``. The model's
    own fused loss still runs beside it (one more pass over the head's chunks)."""
    box = _Capture()

    def score(hidden, weight):
        valid = box.labels != -100
        box.scores = token_scores(hidden[valid], weight, box.labels[valid])

    if hasattr(model, "lm_head"):  # native models: lm_head(h, labels)
        return box, model.lm_head, lambda mod, args, out: score(args[0], mod.weight)
    if getattr(model, "fused_loss", False):  # HFWrap: logits are hidden @ output embeddings
        head = model.hf.get_output_embeddings()
        return box, model.hf.base_model, lambda mod, args, out: score(out.last_hidden_state[0], head.weight)
    raise LongEvalError("model", f"{type(model).__name__}: long-context evaluation needs logits that are "
                        "hidden @ lm_head.weight (no head bias or logit soft-cap)")


@contextmanager
def _eval_mode(run):
    model = run.engine.model
    was_training = model.training
    model.eval()
    box, module, hook = _head_hook(model)
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            yield box
    finally:
        handle.remove()
        model.train(was_training)


def score_rows(run, rows):
    """This rank's scored tokens: ``(row index, positions, losses, hits)`` per local micro-batch.

    Rows go through the run's scatter ``dp`` at a time, so replica ``r`` holds row ``first + r``
    (adaptive: dp 1, every micro-batch of a call is the one row). Every rank runs every forward."""
    dp, dp_rank = getattr(run.scatter, "dp", 1), getattr(run.scatter, "dp_rank", 0)
    autocast = (torch.autocast(run.device.type, dtype=torch.bfloat16)
                if run.spec.train.dtype == "bfloat16" else nullcontext())
    with _eval_mode(run) as box:
        for first in range(0, len(rows), dp):
            group = rows[first:first + dp]
            local = list(run.scatter(StepBatch(group)))
            real = equal_micro_batches(run.engine, local, run.scatter.padding)
            for (tokens, labels, positions, ctx, _), is_real in zip(local, real):
                box.labels, box.scores = labels.to(run.device), None
                with autocast:
                    run.engine.forward(tokens.to(run.device), positions.to(run.device), ctx, box.labels)
                if is_real and dp_rank < len(group):
                    losses, hits = box.scores
                    yield first + dp_rank, positions[labels != -100], losses.cpu(), hits.cpu()


def loss_by_position(run, rows, max_len: int, bucket: int) -> list[dict]:
    """``[{start, end, loss, tokens}]``: mean token loss per position bucket (every rank returns it)."""
    edges = bucket_edges(max_len, bucket)
    sums = torch.zeros(2, len(edges), dtype=torch.float64)  # [loss sum, token count] per bucket
    for _, positions, losses, _ in score_rows(run, rows):
        index = positions // bucket
        sums[0].index_add_(0, index, losses.double())
        sums[1].index_add_(0, index, torch.ones_like(losses, dtype=torch.float64))
    dist.all_reduce(sums)
    return [{"start": s, "end": e, "loss": (sums[0, i] / sums[1, i]).item() if sums[1, i] else float("nan"),
             "tokens": int(sums[1, i])} for i, (s, e) in enumerate(edges)]


def passkey(run, rows, cells) -> list[dict]:
    """``[{length, depth, accuracy, key_prob, trials}]`` per (length, depth) (every rank returns it)."""
    per_row = torch.zeros(len(rows), 3, dtype=torch.float64)  # [key loss, key tokens hit, key tokens]
    for i, _, losses, hits in score_rows(run, rows):
        per_row[i] += torch.tensor([losses.double().sum().item(), float(hits.sum()), float(len(hits))],
                                   dtype=torch.float64)
    dist.all_reduce(per_row)
    out = {}
    for (length, depth), (loss, hit, n) in zip(cells, per_row.tolist()):
        cell = out.setdefault((length, depth), {"length": length, "depth": depth, "correct": 0, "prob": 0.0,
                                                "trials": 0})
        cell["correct"] += int(n > 0 and hit == n)
        cell["prob"] += math.exp(-loss)
        cell["trials"] += 1
    return [{"length": c["length"], "depth": c["depth"], "accuracy": c["correct"] / c["trials"],
             "key_prob": c["prob"] / c["trials"], "trials": c["trials"]} for c in out.values()]


class LongEval:
    """The rows of ``cfg`` (an EvalLongSpec) built once from the held-out data; ``__call__(run)``
    evaluates the run's current weights. Raises :class:`LongEvalError` on data that cannot serve."""

    def __init__(self, spec, held, cfg, names: dict | None = None):
        from seqshard.data.hf_tokenizer import load_tokenizer

        names = names or {}
        if held is None:
            raise LongEvalError(names.get("data", "data.eval"), "long-context evaluation needs held-out data: "
                                "set data.eval.fraction or data.eval.source")
        self.cfg, self.max_len = cfg, cfg.max_len or spec.data.max_seq_len
        self.position_rows = (position_rows(held, self.max_len, cfg.documents, spec.seed,
                                            names.get("max_len", "train.eval_long.max_len")) if cfg.bucket else [])
        p = cfg.passkey
        try:
            self.passkey_rows, self.cells = passkey_rows(held, load_tokenizer(spec.data.tokenizer), p.lengths,
                                                         p.depths, p.trials, spec.seed)
        except LongEvalError as err:
            raise LongEvalError(names.get("passkey", "train.eval_long.passkey"), err.reason) from None

    def __call__(self, run) -> dict:
        out = {}
        if self.position_rows:
            out["by_position"] = loss_by_position(run, self.position_rows, self.max_len, self.cfg.bucket)
        if self.passkey_rows:
            out["passkey"] = passkey(run, self.passkey_rows, self.cells)
        return out


def summary_metrics(result: dict) -> dict:
    """Scalars for ``metrics.jsonl``: the token-weighted long loss, the mean passkey accuracy."""
    out = {}
    if result.get("by_position"):
        b = [x for x in result["by_position"] if x["tokens"]]
        out["long_eval_loss"] = sum(x["loss"] * x["tokens"] for x in b) / max(1, sum(x["tokens"] for x in b))
        out["long_eval_last_bucket_loss"] = b[-1]["loss"] if b else float("nan")
    if result.get("passkey"):
        out["passkey_accuracy"] = sum(x["accuracy"] for x in result["passkey"]) / len(result["passkey"])
    return out


class TrainingLongEval:
    """``train.eval_long`` during training: every ``every`` steps and at the last step, evaluate,
    append the full result to ``<output_dir>/eval_long.jsonl`` (rank 0) and return the scalars
    for the step's metrics. Built before the first step, so bad held-out data stops the run then."""

    def __init__(self, run):
        self.run, self.cfg = run, run.spec.train.eval_long
        self.evaluate = LongEval(run.spec, run.held_out, self.cfg)

    @classmethod
    def for_run(cls, run):
        return cls(run) if run.spec.train.eval_long.every else None

    def __call__(self, step: int, last: int) -> dict:
        if step % self.cfg.every and step != last:
            return {}
        result = self.evaluate(self.run)
        if self.run.denv.rank == 0:
            record = {"step": step, "trained_len": self.run.spec.data.max_seq_len,
                      "max_len": self.evaluate.max_len, **result}
            with open(Path(self.run.spec.train.output_dir) / "eval_long.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return summary_metrics(result)
