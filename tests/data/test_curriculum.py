"""Curriculum sampler: constant tokens per step, per-cycle bucket counts, the sampling rule of
each schedule, and exact resume from state_dict."""
import json

import numpy as np
import pytest

from seqshard.data.curriculum import (SCHEDULES, CurriculumSampler, bucket_probabilities, sampling_odds,
                                      steps_per_bucket)

BUCKETS = {256: 4000, 512: 1500, 1024: 700, 2048: 300, 4096: 100, 8192: 40}
TOKENS = 65536
PROB_TOL = 0.03  # |empirical - exact| for 2000 draws: > 4 standard deviations


def run(sampler, steps):
    return [sampler.next() for _ in range(steps)]


def test_odds_match_their_definitions():
    assert sampling_odds("uniform", 6).tolist() == [1] * 6
    assert sampling_odds("grow_p2", 6).tolist() == [32, 16, 8, 4, 2, 1]
    assert sampling_odds("grow_linear", 6).tolist() == [6, 5, 4, 3, 2, 1]
    assert sampling_odds("shrink", 6).tolist() == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="schedule"):
        sampling_odds("grow_p3", 6)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_constant_tokens_and_exact_cycle_counts(schedule):
    total, cycles = 120, 4
    sampler = CurriculumSampler(BUCKETS, TOKENS, schedule, cycles, total, seed=1)
    picks = run(sampler, total + 30)  # past total_steps the cycles go on
    for length, ids in picks:
        assert length * len(ids) == TOKENS
        assert ((0 <= ids) & (ids < BUCKETS[length])).all()
    tokens = np.array([n * c for n, c in BUCKETS.items()])
    for c in range(5):
        lo, hi = c * total // cycles, (c + 1) * total // cycles
        got = [sum(1 for length, _ in picks[lo:hi] if length == n) for n in BUCKETS]
        assert got == steps_per_bucket(tokens, hi - lo).tolist()
        share = tokens / tokens.sum() * (hi - lo)
        assert np.all(np.abs(np.array(got) - share) < 1)  # proportional to bucket tokens


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_first_pick_follows_odds_times_remaining_steps(schedule):
    lens = sorted(BUCKETS)
    counts = {n: 0 for n in lens}
    for seed in range(2000):
        length, _ = CurriculumSampler(BUCKETS, TOKENS, schedule, 2, 200, seed).next()
        counts[length] += 1
    plan = CurriculumSampler(BUCKETS, TOKENS, schedule, 2, 200).cycle_plan(0)
    expected = bucket_probabilities(sampling_odds(schedule, len(lens)), plan)
    empirical = np.array([counts[n] for n in lens]) / 2000
    assert np.abs(empirical - expected).max() < PROB_TOL, (empirical, expected)


def mean_length(schedule, part):
    """Mean chunk length in the first or last third of a 60-step cycle, over 20 seeds."""
    vals = []
    for seed in range(20):
        lens = [n for n, _ in run(CurriculumSampler(BUCKETS, TOKENS, schedule, 1, 60, seed), 60)]
        vals += lens[:20] if part == "first" else lens[-20:]
    return np.mean(vals)


def test_grow_schedules_start_short_and_shrink_starts_long():
    for schedule in ("grow_p2", "grow_linear"):
        assert mean_length(schedule, "first") < mean_length(schedule, "last")
    assert mean_length("shrink", "first") > mean_length("shrink", "last")
    assert mean_length("grow_p2", "first") < mean_length("uniform", "first") < mean_length("shrink", "first")


def test_chunks_of_a_bucket_cycle_through_all_before_repeating():
    sampler = CurriculumSampler({64: 10, 128: 3}, 256, "uniform", 1, 40, seed=3)
    taken = {64: [], 128: []}
    for length, ids in run(sampler, 40):
        taken[length] += ids.tolist()
    for n, ids in taken.items():
        size = {64: 10, 128: 3}[n]
        for e in range(len(ids) // size):
            assert sorted(ids[e * size:(e + 1) * size]) == list(range(size))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_resume_gives_the_same_batches(schedule):
    a = CurriculumSampler(BUCKETS, TOKENS, schedule, 3, 50, seed=7)
    first = run(a, 23)
    state = json.loads(json.dumps(a.state_dict()))  # plain ints and lists
    rest = run(a, 40)
    b = CurriculumSampler(BUCKETS, TOKENS, schedule, 3, 50, seed=7)
    b.load_state_dict(state)
    for (la, ia), (lb, ib) in zip(rest, run(b, 40)):
        assert la == lb and np.array_equal(ia, ib)
    fresh = run(CurriculumSampler(BUCKETS, TOKENS, schedule, 3, 50, seed=7), 23)
    assert all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(first, fresh))


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="tokens_per_step"):
        CurriculumSampler({256: 5, 8192: 1}, 1000)
    with pytest.raises(ValueError, match="min_seq_len"):
        CurriculumSampler({256: 0}, 1024)
