"""The pack and decompose batch builders: rows within capacity, documents never mixed inside an
attention segment, every token once, per-step stats, exact resume."""
import json

import numpy as np
import pytest
import torch

from seqshard.data.builders import DecomposeBuilder, PackBuilder
from seqshard.models import ModelConfig, VarlenContext, build_llama
from seqshard.parallel.decompose import decompose

DOC = 100_000  # stand-in token id = doc * DOC + offset in the document
ATOL = 1e-5  # fp32 logits, packed row vs each document alone


class TinyCorpus:
    """In-memory stand-in for seqshard.data.corpus.Corpus: ``lengths`` and ``tokens(i)``."""

    def __init__(self, lengths, vocab=None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.vocab = vocab

    def tokens(self, i):
        ids = torch.arange(int(self.lengths[i]), dtype=torch.int64) + int(i) * DOC
        return ids % self.vocab if self.vocab else ids


def corpus(n=300, seed=0, high=3000):
    return TinyCorpus(np.random.default_rng(seed).integers(2, high, n))


def segments(row):
    start = 0
    for n in row.doc_lens:
        yield start, start + n
        start += n


def check_row(row, capacity, restart=True):
    """Every segment is one contiguous run of one document; labels stay inside it."""
    assert len(row) <= capacity and sum(row.doc_lens) == len(row)
    for a, b in segments(row):
        tok = row.tokens[a:b]
        docs, offsets = tok // DOC, tok % DOC
        assert (docs == docs[0]).all()
        assert torch.equal(offsets, offsets[0] + torch.arange(b - a))
        assert torch.equal(row.labels[a:b - 1], tok[1:]) and row.labels[b - 1] == -100
        first = 0 if restart else int(offsets[0])
        assert torch.equal(row.positions[a:b], first + torch.arange(b - a))


def same_batches(xs, ys):
    for x, y in zip(xs, ys):
        assert x.stats == y.stats and len(x.rows) == len(y.rows)
        for r, s in zip(x.rows, y.rows):
            assert torch.equal(r.tokens, s.tokens) and torch.equal(r.labels, s.labels)
            assert torch.equal(r.positions, s.positions) and r.doc_lens == s.doc_lens


def check_stats(batch, rows_capacity):
    lens = np.array([n for r in batch.rows for n in r.doc_lens])
    assert batch.stats["pad_fraction"] == pytest.approx(1 - lens.sum() / rows_capacity)
    assert batch.stats["seq_len_mean"] == pytest.approx(lens.mean())
    assert batch.stats["seq_len_max"] == lens.max()
    assert batch.stats["attention_flops"] == 2 * int((lens ** 2).sum())


@pytest.mark.parametrize("method", ["bfd", "ffd", "spfhp", "greedy"])
def test_pack_rows_respect_capacity_and_documents(method):
    data = corpus()
    builder = PackBuilder(data, 1024, 8192, method, seed=0)
    for _ in range(6):
        batch = builder.next_batch()
        assert len(batch.rows) == 8
        for row in batch.rows:
            check_row(row, 1024)
        check_stats(batch, 8192)


def test_pack_covers_every_token_exactly_once():
    data = corpus(400, seed=1, high=5000)  # some documents longer than a row
    builder = PackBuilder(data, 1024, 4096, "bfd", seed=2)
    seen = []
    for _ in range(25):
        for row in builder.next_batch().rows:
            seen.append(row.tokens)
    assert builder.epoch == 0
    for doc, start, length, _ in builder.carry.tolist():
        seen.append(data.tokens(doc)[start:start + length])
    read = builder._epoch_order(0)[:builder.cursor]
    expected = torch.cat([data.tokens(d) for d in read])
    got = torch.cat(seen)
    assert torch.equal(torch.sort(got).values, torch.sort(expected).values)
    pads = []
    for _ in range(20):
        pads.append(builder.next_batch().stats["pad_fraction"])
    assert np.mean(pads) < 0.05  # a window of packing leaves little room unfilled


def test_pack_positions_can_continue_across_pieces():
    data = TinyCorpus([2500, 300, 40, 700])
    builder = PackBuilder(data, 1024, 2048, "bfd", seed=0, restart_positions=False)
    for _ in range(3):
        for row in builder.next_batch().rows:
            check_row(row, 1024, restart=False)


@pytest.mark.parametrize("builder_fn", [
    lambda c: PackBuilder(c, 1024, 8192, "bfd", seed=3),
    lambda c: DecomposeBuilder(c, 1024, 64, 8192, "grow_p2", 2, 12, seed=3),
])
def test_resume_gives_the_same_batches(builder_fn):
    data = corpus(200, seed=4)
    a = builder_fn(data)
    for _ in range(4):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    after = [a.next_batch() for _ in range(5)]
    b = builder_fn(data)
    b.load_state_dict(state)
    same_batches(after, [b.next_batch() for _ in range(5)])


def test_decompose_rows_are_chunks_of_one_bucket():
    data = corpus(300, seed=5)
    builder = DecomposeBuilder(data, 1024, 64, 8192, "uniform", 1, 30, seed=0)
    chunks = {tuple(c) for cs in decompose(data.lengths, 1024, 64).values() for c in cs.tolist()}
    lengths_seen = set()
    for _ in range(30):
        batch = builder.next_batch()
        length = len(batch.rows[0])
        lengths_seen.add(length)
        assert len(batch.rows) * length == 8192
        for row in batch.rows:
            check_row(row, length)
            assert row.doc_lens == [length]
            doc, start = int(row.tokens[0]) // DOC, int(row.tokens[0]) % DOC
            assert (doc, start, length) in chunks
        check_stats(batch, 8192)
        assert batch.stats["pad_fraction"] == 0.0
    assert len(lengths_seen) > 1


def test_packed_row_never_attends_across_documents():
    """Through the model: a packed row's logits equal each document's logits on its own."""
    torch.manual_seed(0)
    model = build_llama(ModelConfig()).eval()
    data = TinyCorpus(np.random.default_rng(6).integers(2, 300, 40), vocab=256)
    row = PackBuilder(data, 512, 1024, "bfd", seed=0).next_batch().rows[0]
    assert len(row.doc_lens) > 1
    with torch.no_grad():
        packed = model(row.tokens, row.positions, VarlenContext.from_lengths(row.doc_lens))
        for a, b in segments(row):
            alone = model(row.tokens[a:b], row.positions[a:b], VarlenContext.from_lengths([b - a]))
            torch.testing.assert_close(packed[a:b], alone, atol=ATOL, rtol=ATOL)


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="data.tokens_per_step"):
        PackBuilder(corpus(), 1024, 1000)
    with pytest.raises(ValueError, match="data.tokens_per_step"):
        DecomposeBuilder(corpus(), 1024, 64, 1000)


def test_pack_holds_a_long_document_once():
    """One document of 200 rows beside 3 short ones: the pool holds it once, as index ranges
    (issue 16: it held 128 copies and took 35 s per step on a 5 MB document)."""
    data = TinyCorpus([200 * 256 + 17, 30, 40, 50])
    builder = PackBuilder(data, 256, 1024, "bfd", seed=0)
    seen = []
    for _ in range(6):
        for row in builder.next_batch().rows:
            check_row(row, 256)
            seen.extend(row.tokens.tolist())
        long_tokens = builder.carry[builder.carry[:, 0] == 0, 2].sum()
        assert long_tokens <= data.lengths[0], f"pool holds {long_tokens / data.lengths[0]:.1f} copies"
    assert len(seen) == len(set(seen)) == 24 * 256  # 6 steps x 4 full rows, no token twice
