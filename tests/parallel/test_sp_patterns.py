"""Issue #29: windows, soft-caps, chunks and sinks under every SP method on real gloo ranks,
against the dense single-device reference (fp32, forward and every gradient), and the windowed
ring's bytes against the analytic minimum."""
import pytest

from tests.helpers.ranks import run_ranks
from tests.parallel.sp_pattern_checks import check_method_patterns, check_usp_patterns, measure_window_ring_bytes

# (document lengths, heads, kv heads, causal, pattern): windows shorter than a rank's chunk and
# longer than it, a soft-cap with sinks, chunks, a two-sided window without causality
CASES_2 = [
    ([3, 41, 1, 27], 4, 2, True, dict(window_size=(6, 0))),
    ([50], 4, 2, True, dict(window_size=(17, -1), softcap=4.0, sinks=True)),
    ([30, 9], 4, 1, True, dict(chunk_size=8)),
    ([23, 18], 4, 4, False, dict(window_size=(5, 3))),
    ([19, 12], 4, 2, True, dict(softcap=3.0, sinks=True)),
]
CASES_4 = [
    ([70, 5], 4, 2, True, dict(window_size=(9, 0), sinks=True)),
    ([64], 8, 2, True, dict(chunk_size=16, softcap=2.0)),
]
SLOW = pytest.mark.slow  # the default suite keeps one layout per method (two for ring)
METHODS = [("ulysses", "stream"), pytest.param("ulysses", "zigzag", marks=SLOW), ("allgather", "zigzag"),
           pytest.param("allgather", "contiguous", marks=SLOW), ("ring", "zigzag"), ("ring", "contiguous"),
           pytest.param("ring", "stream", marks=SLOW)]


@pytest.mark.parametrize("method,layout", METHODS)
def test_patterns_two_ranks(method, layout):
    assert all(run_ranks(2, check_method_patterns, method, CASES_2, layout))


@pytest.mark.parametrize("method,layout", [pytest.param("ulysses", "zigzag", marks=SLOW),
                                           pytest.param("allgather", "zigzag", marks=SLOW), ("ring", "zigzag"),
                                           pytest.param("ring", "contiguous", marks=SLOW)])
def test_patterns_four_ranks(method, layout):
    assert all(run_ranks(4, check_method_patterns, method, CASES_4, layout))


def test_patterns_usp_2x2():
    assert all(run_ranks(4, check_usp_patterns, 2, CASES_4 + CASES_2[:2], "zigzag"))


@pytest.mark.parametrize("layout", [pytest.param("contiguous", marks=SLOW), "zigzag"])
def test_window_ring_sends_only_the_window(layout):
    """W << L: each rank sends the keys inside other ranks' windows, nothing else (<= 1.05x the
    brute-force minimum, and far below the full ring)."""
    for sent, minimum, full_ring in run_ranks(4, measure_window_ring_bytes, 1024, 32, layout, 2, 8):
        assert sent <= 1.05 * minimum, (sent, minimum)
        assert sent <= full_ring / 10, (sent, full_ring)


def test_ulysses_uneven_heads_cut_the_sinks_right():
    """3 ranks, 4 query heads (2/1/1 by the uneven all-to-all): each rank's sinks are its heads'."""
    cases = [([23, 9], 4, 2, True, dict(window_size=(5, 0), sinks=True))]
    assert all(run_ranks(3, check_method_patterns, "ulysses", cases, "stream"))
