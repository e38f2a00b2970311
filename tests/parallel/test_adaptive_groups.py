"""Adaptive groups whose sizes are not powers of two, nor aligned: on 3 real gloo ranks, each
group's attention (the method the plan names) equals the single-process reference, forward and
dq/dk/dv; groups are created lazily from the plan, in the same order on every rank."""
import pytest

from tests.helpers.ranks import run_ranks

# (groups of the plan, method of the group larger than one); 4 query heads, so a group of 3
# runs uneven Ulysses (2/1/1 heads) or ring
PLANS = [([(0, 3)], "ulysses"), ([(0, 3)], "ring"), ([(0, 1), (1, 2)], "ring"), ([(0, 2), (2, 1)], "ulysses")]
CASES = [([5, 2, 31, 1], 4, 2, True), ([17, 9], 4, 4, True)]


def check_adaptive_groups(rank, world):
    from seqshard.parallel.adaptive import AdaptiveContext, adaptive_attention, ensure_groups
    from seqshard.parallel.parallelize import DEFAULT_LAYOUT
    from tests.parallel.sp_checks import compare_case

    groups = {}
    for layout, method in PLANS:
        ensure_groups(groups, layout)  # collective: every rank, same plan order
        first, size = next((f, s) for f, s in layout if f <= rank < f + s)
        if size == 1:
            continue  # a group of one runs plain local attention (the reference itself)
        shard_layout = "contiguous" if method == "ulysses" else DEFAULT_LAYOUT[method]

        def run(q, k, v, plan, causal, group=groups[(first, size)], method=method):
            return adaptive_attention(q, k, v, AdaptiveContext(plan=plan, group=group, method=method))

        for case in CASES:
            compare_case(rank - first, size, run, case, shard_layout, f"{method} group {(first, size)}")
    return sorted(groups)


def test_non_power_of_two_and_unaligned_groups_match_reference():
    got = run_ranks(3, check_adaptive_groups)
    assert got[0] == got[1] == got[2] == [(0, 1), (0, 2), (0, 3), (1, 2), (2, 1)]
