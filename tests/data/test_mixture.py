"""data/mixture.py: weighted draws, long-document upsampling, the long-document policy and
continued positions; pure, in one process (issue #30 items 2 and 4)."""
import numpy as np
import pytest
import torch

from seqshard.data.builders import DecomposeBuilder, PackBuilder
from seqshard.data.mixture import MixtureCorpus, SourceMetrics, apply_long_documents
from seqshard.data.sources import UpsampleLong
from seqshard.data.window import WindowBuilder
from tests.data.test_builders import TinyCorpus

SHARE_TOL = 0.02  # the bound: 2 percentage points over 10,000 documents


def mixture(weights, sizes=(300, 200, 100), upsample=None, seed=0):
    parts = [TinyCorpus(np.random.default_rng([seed, i]).integers(2, 400, n)) for i, n in enumerate(sizes)]
    return MixtureCorpus(parts, weights, [f"s{i}" for i in range(len(sizes))],
                         upsample or [UpsampleLong()] * len(sizes))


def draws(corpus, n, seed=3):
    out, epoch = [], 0
    while sum(map(len, out)) < n:
        out.append(corpus.order(seed, epoch))
        epoch += 1
    return np.concatenate(out)[:n]


def test_shares_follow_weights_over_10000_documents():
    corpus = mixture([0.6, 0.3, 0.1])
    picked = corpus.source_ids[draws(corpus, 10_000)]
    shares = np.bincount(picked, minlength=3) / len(picked)
    assert np.all(np.abs(shares - [0.6, 0.3, 0.1]) <= SHARE_TOL), shares


def test_order_is_a_function_of_seed_and_epoch():
    a, b = mixture([2, 1, 1]), mixture([2, 1, 1])
    assert np.array_equal(a.order(5, 3), b.order(5, 3))
    assert not np.array_equal(a.order(5, 3), a.order(5, 4))
    assert not np.array_equal(a.order(5, 3), a.order(6, 3))


def test_one_plain_source_keeps_the_plain_permutation():
    corpus = mixture([1.0], sizes=(50,))
    assert np.array_equal(corpus.order(7, 2), np.random.default_rng([7, 2]).permutation(50))


def test_long_documents_appear_factor_times_per_pass():
    lengths = np.array([10, 500, 20, 800, 30, 40])  # documents 1 and 3 are long (>= 300)
    corpus = MixtureCorpus([TinyCorpus(lengths)], [1.0], ["a"], [UpsampleLong(min_len=300, factor=4)])
    for epoch in range(3):  # one source: an epoch is exactly one pass
        counts = np.bincount(corpus.order(0, epoch), minlength=6)
        assert counts.tolist() == [1, 4, 1, 4, 1, 1]


def test_upsampled_documents_are_drawn_factor_times_as_often_in_a_mixture():
    lengths = np.array([10, 500] * 50)
    up = TinyCorpus(lengths)
    corpus = MixtureCorpus([up, TinyCorpus(np.full(100, 50))], [0.5, 0.5], ["up", "plain"],
                           [UpsampleLong(min_len=300, factor=3), UpsampleLong()])
    picked = draws(corpus, 60_000)
    picked = picked[corpus.source_ids[picked] == 0]
    long_share = np.mean(lengths[picked] >= 300)
    assert abs(long_share - 3 / 4) < 0.01, long_share  # 3 copies of each long one per 1 short one


@pytest.mark.parametrize("batching", ["window", "pack", "decompose"])
def test_builders_resume_a_mixture_mid_epoch_exactly(batching):
    corpus = mixture([0.5, 0.3, 0.2], upsample=[UpsampleLong(300, 2), UpsampleLong(), UpsampleLong()])

    def build():
        if batching == "window":
            return SourceMetrics(WindowBuilder(corpus, 256, 1024, seed=1))
        if batching == "pack":
            return SourceMetrics(PackBuilder(corpus, 256, 1024, "bfd", seed=1))
        return SourceMetrics(DecomposeBuilder(corpus.sampled_view(1), 256, 32, 1024, total_steps=20, seed=1))

    ref = build()
    steps = [ref.next_batch() for _ in range(40)]  # several epochs of the window builder
    resumed = build()
    for _ in range(17):
        resumed.next_batch()
    state = resumed.state_dict()
    again = build()
    again.load_state_dict(state)
    for want in steps[17:]:
        got = again.next_batch()
        assert got.stats["tokens_by_source"] == want.stats["tokens_by_source"]
        for a, b in zip(got.rows, want.rows):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions, b.positions)
    counts = steps[0].stats["tokens_by_source"]
    assert set(counts) == {"s0", "s1", "s2"} and sum(counts.values()) == steps[0].num_tokens


def test_truncate_and_drop():
    corpus = TinyCorpus([100, 700, 300])
    cut = apply_long_documents(corpus, "truncate", 256, "x")
    assert cut.lengths.tolist() == [100, 256, 256]
    assert torch.equal(cut.tokens(1), corpus.tokens(1)[:256])
    kept = apply_long_documents(corpus, "drop", 256, "x")
    assert kept.lengths.tolist() == [100] and torch.equal(kept.tokens(0), corpus.tokens(0))
    assert apply_long_documents(corpus, "split", 256, "x") is corpus


@pytest.mark.parametrize("batching", ["window", "pack", "decompose"])
def test_continue_positions_run_on_across_pieces(batching):
    corpus = MixtureCorpus([TinyCorpus([600, 600, 600, 600])], [1.0], ["a"], [UpsampleLong()])
    for cont in (False, True):
        if batching == "window":
            builder = WindowBuilder(corpus, 256, 512, 0, cont)
        elif batching == "pack":
            builder = PackBuilder(corpus, 256, 512, "bfd", 0, restart_positions=not cont)
        else:
            builder = DecomposeBuilder(corpus, 256, 64, 512, total_steps=4, seed=0, continue_positions=cont)
        for _ in range(4):
            for row in builder.next_batch().rows:
                start = 0
                for n, doc in zip(row.doc_lens, row.docs):
                    first = int(row.tokens[start]) - doc * 100_000  # TinyCorpus: id = doc * DOC + offset
                    want = torch.arange(first, first + n) if cont else torch.arange(n)
                    assert torch.equal(row.positions[start:start + n], want), (batching, cont)
                    start += n
