"""Dataset decomposition: power-of-two chunks, contiguous per document, the kept length, and
bucket sizes from the binary representation of each length."""
import numpy as np
import pytest

from seqshard.parallel.decompose import bucket_tokens, decompose, kept_lengths


def chunks_by_doc(buckets):
    rows = np.concatenate(list(buckets.values()))
    return {d: sorted(map(tuple, rows[rows[:, 0] == d, 1:].tolist())) for d in np.unique(rows[:, 0]).tolist()}


def test_paper_example():
    buckets = decompose([9000], 8192, 1)
    assert chunks_by_doc(buckets)[0] == [(0, 8192), (8192, 512), (8704, 256), (8960, 32), (8992, 8)]
    assert list(buckets) == [8, 32, 256, 512, 8192]


@pytest.mark.parametrize("max_len,min_len,keep", [(8192, 256, False), (1024, 64, True), (256, 1, False), (64, 64, False)])
def test_chunks_are_powers_of_two_and_cover_the_kept_length(max_len, min_len, keep):
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(0, 5 * max_len, 400), [0, 1, max_len, max_len - 1, 3 * max_len]])
    buckets = decompose(lengths, max_len, min_len, keep_remainder=keep)
    kept = kept_lengths(lengths, max_len, min_len, keep)
    for size, chunks in buckets.items():
        assert size & (size - 1) == 0 and size <= max_len and (keep or size >= min_len)
        assert len(chunks) and (chunks[:, 2] == size).all()
    by_doc = chunks_by_doc(buckets)
    for d, length in enumerate(lengths.tolist()):
        pieces = by_doc.get(d, [])
        starts = np.cumsum([0] + [n for _, n in pieces])
        assert [s for s, _ in pieces] == starts[:-1].tolist()  # contiguous from the start
        assert starts[-1] == kept[d]
        sizes = [n for _, n in pieces]
        assert sizes == sorted(sizes, reverse=True)  # largest first
    if keep:
        assert np.array_equal(kept, lengths)


def test_bucket_sizes_follow_binary_representation():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 40000, 500)
    max_len, min_len = 4096, 128
    buckets = decompose(lengths, max_len, min_len)
    expected = {}
    for n in lengths.tolist():
        if n // max_len:
            expected[max_len] = expected.get(max_len, 0) + n // max_len
        for bit in range(12):
            size = 1 << bit
            if size >= min_len and (n % max_len) & size:
                expected[size] = expected.get(size, 0) + 1
    assert {k: len(v) for k, v in buckets.items()} == expected
    assert sum(bucket_tokens(buckets).values()) == kept_lengths(lengths, max_len, min_len).sum()


def test_bad_sizes_name_the_fix():
    with pytest.raises(ValueError, match="max_len must be a power of two"):
        decompose([10], 1000)
    with pytest.raises(ValueError, match="min_len 512 must be <= max_len 256"):
        decompose([10], 256, 512)
