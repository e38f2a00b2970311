"""Packing: capacity, exact token coverage, determinism, agreement with naive sequential
bin packing, and efficiency against the lower bound on real (stdlib) lengths."""
import glob
import os
import sysconfig
import time

import numpy as np
import pytest

from seqshard.parallel.packing import METHODS, pack, pack_pieces

CAPACITY = 8192
STDLIB_BOUND_RATIO = 0.99  # bins must be within 1% of ceil(total / capacity)


def stdlib_lengths():
    """Token counts of the stdlib corpus: file size in bytes + BOS + EOS."""
    root = sysconfig.get_paths()["stdlib"]
    lengths = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "site-packages" in path:
            continue
        try:
            lengths.append(os.path.getsize(path) + 2)
        except OSError:
            continue
    return np.array(lengths, dtype=np.int64)


def naive_loads(sizes, capacity, method):
    """Sequential reference: sorted bin loads of bfd / ffd / spfhp (worst fit) on sizes taken
    longest first, or next fit in order for greedy."""
    loads = []
    order = sizes if method == "greedy" else sorted(sizes, reverse=True)
    for s in order:
        fits = [b for b, load in enumerate(loads) if load + s <= capacity]
        if method == "greedy":
            fits = fits[-1:] if loads and len(loads) - 1 in fits else []
        if not fits:
            loads.append(s)
            continue
        key = {"bfd": lambda b: (capacity - loads[b], b), "ffd": lambda b: b,
               "spfhp": lambda b: (-(capacity - loads[b]), b), "greedy": lambda b: b}[method]
        loads[min(fits, key=key)] += s
    return sorted(loads)


def check_valid(result, lengths):
    """Every bin within capacity; every token of every document in exactly one piece, one bin."""
    assert result.bin_lengths().max() <= result.capacity
    placed = sorted(p for b in result.bins for p in b)
    assert placed == list(range(len(result.pieces)))
    pieces = result.pieces
    covered = np.zeros(len(lengths), np.int64)
    for doc, start, length in pieces.tolist():
        assert start == covered[doc], (doc, start, covered[doc])  # contiguous, in order
        covered[doc] += length
    assert np.array_equal(covered, lengths)


def random_lengths(rng, n, capacity):
    return rng.integers(1, int(2.5 * capacity), n)


@pytest.mark.parametrize("method", METHODS)
def test_matches_sequential_reference(method):
    rng = np.random.default_rng(0)
    for trial in range(30):
        capacity = int(rng.choice([7, 16, 100, 1000]))
        lengths = rng.integers(1, capacity + 1, int(rng.integers(1, 60)))
        result = pack_pieces(lengths, capacity, method, seed=trial)
        check_valid(result, lengths)
        assert sorted(result.bin_lengths().tolist()) == naive_loads(lengths.tolist(), capacity, method)


@pytest.mark.parametrize("method", METHODS)
def test_splits_long_documents_and_covers_every_token(method):
    rng = np.random.default_rng(1)
    lengths = np.concatenate([random_lengths(rng, 300, 512), [512, 1024, 5000, 1]])
    result = pack_pieces(lengths, 512, method, seed=3)
    check_valid(result, lengths)
    assert result.lower_bound == -(-lengths.sum() // 512)
    assert result.efficiency == pytest.approx(lengths.sum() / (result.num_bins * 512))


@pytest.mark.parametrize("method", METHODS)
def test_document_index_bins_list_pieces_in_order(method):
    """pack(): the k-th bin holding document d holds its tokens [k*capacity, (k+1)*capacity)."""
    capacity = 512
    lengths = np.array([300, 1300, 100, 1024, 700, 40, 511])
    seen = np.zeros(len(lengths), np.int64)
    for b in pack(lengths, capacity, method, seed=0):
        load = 0
        for d in b:
            load += min(capacity, lengths[d] - capacity * seen[d])
            seen[d] += 1
        assert load <= capacity
    assert np.array_equal(seen, -(-lengths // capacity))


def test_piece_offsets_and_positions_flag():
    lengths = [1000, 20]
    restart = pack_pieces(lengths, 512, "bfd")
    cont = pack_pieces(lengths, 512, "bfd", restart_positions=False)
    assert restart.pieces.tolist() == [[0, 0, 512], [0, 512, 488], [1, 0, 20]]
    assert restart.position_offsets().tolist() == [0, 0, 0]
    assert cont.position_offsets().tolist() == [0, 512, 0]
    assert pack(lengths, 512, "bfd") == [[0], [0, 1]]


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_for_a_seed(method):
    lengths = random_lengths(np.random.default_rng(2), 2000, 1024)
    a, b = pack_pieces(lengths, 1024, method, seed=5), pack_pieces(lengths, 1024, method, seed=5)
    assert a.bins == b.bins
    other = pack_pieces(lengths, 1024, method, seed=6)
    assert other.num_bins == a.num_bins  # the seed only breaks ties between equal lengths


def test_decreasing_methods_never_worse_than_greedy():
    rng = np.random.default_rng(3)
    for trial in range(40):
        capacity = int(rng.choice([64, 1000, 8192]))
        lengths = np.maximum(1, rng.lognormal(np.log(capacity / 8), 1.5, int(rng.integers(5, 500))).astype(int))
        greedy = pack_pieces(lengths, capacity, "greedy").num_bins
        for method in ("bfd", "ffd", "spfhp"):
            assert pack_pieces(lengths, capacity, method, seed=trial).num_bins <= greedy, (trial, method)


def test_priority_pieces_open_the_first_bins():
    rng = np.random.default_rng(4)
    lengths = rng.integers(1, 1000, 200)
    priority = (np.arange(200) % 7 == 0).astype(int)
    result = pack_pieces(lengths, 1000, "bfd", priority=priority)
    check_valid(result, lengths)
    has_priority = [bool(priority[result.pieces[b, 0]].any()) for b in result.bins]
    first_without = has_priority.index(False)
    assert not any(has_priority[first_without:])  # bins holding priority pieces form a prefix


@pytest.mark.parametrize("method", ["bfd", "ffd", "spfhp"])
def test_stdlib_lengths_within_one_percent_of_bound(method):
    lengths = stdlib_lengths()
    assert len(lengths) > 500
    result = pack_pieces(lengths, CAPACITY, method)
    check_valid(result, lengths)
    assert result.lower_bound / result.num_bins >= STDLIB_BOUND_RATIO, (result.num_bins, result.lower_bound)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="method"):
        pack([1, 2], 8, "worst")
    with pytest.raises(ValueError, match="document 1"):
        pack([3, 0, 2], 8)
    with pytest.raises(ValueError, match="capacity"):
        pack([3], 0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bfd", "spfhp", "greedy"])
def test_one_million_lengths_under_two_seconds(method):
    rng = np.random.default_rng(5)
    lengths = np.minimum(rng.lognormal(7, 1.3, 1_000_000).astype(np.int64) + 2, 1 << 20)
    start = time.perf_counter()
    result = pack_pieces(lengths, CAPACITY, method)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed
    assert result.bin_lengths().max() <= CAPACITY


def test_adaptive_group_packing_keeps_every_document_within_budget_and_beats_packing_in_order():
    from seqshard.parallel.adaptive import pack_group

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1024, 200).tolist()
    ids = list(range(3, 200, 2))
    bins = pack_group(ids, lengths, 1024)
    assert sorted(i for b in bins for i in b) == ids
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    in_order, used = 1, 0  # what packing consecutive documents needs
    for i in ids:
        if used + lengths[i] > 1024:
            in_order, used = in_order + 1, 0
        used += lengths[i]
    assert len(bins) < in_order
    assert pack_group([], lengths, 1024) == []
