"""Every SP method equals single-device varlen attention, forward and dq/dk/dv, on real gloo groups."""
import pytest

from tests.helpers.ranks import run_ranks
from tests.parallel.sp_checks import check_method

# packed batches: documents shorter than 2P tokens, one spanning all ranks, a single document; GQA
CASES_2 = [([3, 17, 1, 19], 4, 2, True), ([3, 17, 1, 19], 4, 4, False), ([40], 4, 1, True)]
CASES_4 = [([5, 2, 61, 1, 7], 8, 2, True), ([29], 4, 4, False), ([6, 33, 9], 8, 8, True)]


@pytest.mark.parametrize("method,layout", [("ulysses", "stream"), ("ulysses", "zigzag"),
                                           ("allgather", "zigzag"), ("allgather", "contiguous"),
                                           ("ring", "zigzag"), ("ring", "contiguous"), ("ring", "stream")])
def test_two_ranks(method, layout):
    assert all(run_ranks(2, check_method, method, CASES_2, layout))


@pytest.mark.parametrize("method,layout", [("ulysses", "zigzag"), ("allgather", "stream"), ("ring", "zigzag")])
def test_four_ranks(method, layout):
    assert all(run_ranks(4, check_method, method, CASES_4, layout))


def test_usp_2x2():
    from tests.parallel.sp_checks import check_usp

    assert all(run_ranks(4, check_usp, 2, CASES_4, "zigzag"))


def test_ulysses_uneven_heads_three_ranks():
    """3 ranks, 4 query heads: heads split unevenly (2/1/1) by an uneven all-to-all; GQA kv heads
    expanded per query head."""
    cases = [([5, 2, 31, 1], 4, 2, True), ([17], 4, 4, False), ([9, 12], 4, 1, True)]
    assert all(run_ranks(3, check_method, "ulysses", cases, "stream"))
