"""Variable-sequence-length curriculum over dataset-decomposition buckets (Pouransari et al. 2024,
"Dataset Decomposition", Sec. 2.3 and 3.3).

Every step draws its whole batch from one bucket of equal-length chunks, with a constant number of
tokens per step: batch size ``tokens_per_step // chunk_len``. Training is split into ``cycles``
cycles of (near-)equal step counts; cycle ``c`` covers steps ``[c*T//K, (c+1)*T//K)`` for
``total_steps = T`` and ``cycles = K`` and continues with the same rule after step T. In each
cycle, bucket ``i`` gets ``n_i`` steps in proportion to its share of the tokens (largest
remainder rounding), so every cycle sees the data mix of the corpus. Within a cycle, step ``t``
picks bucket ``i`` with probability

    p_i(t) = w_i * r_i(t) / sum_j w_j * r_j(t)

where ``r_i(t)`` is the number of steps bucket ``i`` has left in the cycle and ``w_i`` are the
schedule's sampling odds (buckets indexed from the shortest chunk, ``i = 0 .. B-1``):

- ``uniform``:     ``w_i = 1`` (a uniformly random order of the cycle's steps);
- ``grow_p2``:     ``w_i = 2 ** (B - 1 - i)`` (odds 32:16:8:4:2:1 for 256..8192: short first);
- ``grow_linear``: ``w_i = B - i`` (odds 6:5:4:3:2:1);
- ``shrink``:      ``w_i = 2 ** i`` (odds 1:2:4:8:16:32: long first).

Since the ``r_i`` run down to 0, the cycle takes exactly ``n_i`` steps from each bucket whatever the
odds; the odds only move short (``grow_*``) or long (``shrink``) sequences to the start of the cycle,
and the cycles restart the curriculum (the paper's cyclic schedule).

Chunks inside a bucket are taken in a seeded random order, epoch after epoch. The sampler's
state is a few lists of ints; the random draw of step t is seeded by ``(seed, t)``, so
``load_state_dict(state_dict())`` resumes with the same batches.
"""
from __future__ import annotations

import numpy as np

SCHEDULES = ("uniform", "grow_p2", "grow_linear", "shrink")


def sampling_odds(schedule: str, num_buckets: int) -> np.ndarray:
    """The odds ``w_i`` of the module doc, bucket 0 holding the shortest chunks."""
    i = np.arange(num_buckets, dtype=np.float64)
    if schedule == "uniform":
        return np.ones(num_buckets)
    if schedule == "grow_p2":
        return 2.0 ** (num_buckets - 1 - i)
    if schedule == "grow_linear":
        return num_buckets - i
    if schedule == "shrink":
        return 2.0 ** i
    raise ValueError(f"curriculum: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


def bucket_probabilities(odds: np.ndarray, remaining) -> np.ndarray:
    """``p_i = w_i r_i / sum_j w_j r_j`` for the steps ``remaining`` per bucket in the cycle."""
    weights = odds * np.asarray(remaining, dtype=np.float64)
    return weights / weights.sum()


def steps_per_bucket(tokens: np.ndarray, steps: int) -> np.ndarray:
    """Split ``steps`` over buckets in proportion to their tokens (largest remainder, ties to the
    shorter bucket)."""
    share = np.asarray(tokens, dtype=np.float64) / float(np.sum(tokens)) * steps
    n = np.floor(share).astype(np.int64)
    extra = steps - int(n.sum())
    n[np.argsort(-(share - n), kind="stable")[:extra]] += 1
    return n


def cycle_start(cycle: int, total_steps: int, cycles: int) -> int:
    return cycle * total_steps // cycles


class CurriculumSampler:
    """Pick one bucket per step and the chunks of its batch (see the module doc).

    ``bucket_sizes`` maps chunk length (a power of two dividing ``tokens_per_step``) to the number
    of chunks in that bucket. :meth:`next` returns ``(chunk_len, chunk_ids)``: ids index the
    bucket's chunk list, ``tokens_per_step // chunk_len`` of them.
    """

    def __init__(self, bucket_sizes: dict[int, int], tokens_per_step: int, schedule: str = "uniform",
                 cycles: int = 1, total_steps: int = 1, seed: int = 0):
        self.lens = sorted(int(n) for n, count in bucket_sizes.items() if count > 0)
        if not self.lens:
            raise ValueError("curriculum: every bucket is empty; lower data.min_seq_len or add documents")
        if any(tokens_per_step % n for n in self.lens):
            raise ValueError(f"curriculum: tokens_per_step {tokens_per_step} must be a multiple of every "
                             f"chunk length {self.lens}")
        if cycles < 1 or total_steps < 1:
            raise ValueError(f"curriculum: cycles ({cycles}) and total_steps ({total_steps}) must be >= 1")
        self.counts = np.array([bucket_sizes[n] for n in self.lens], dtype=np.int64)
        self.batch = [tokens_per_step // n for n in self.lens]
        self.odds = sampling_odds(schedule, len(self.lens))
        self.cycles, self.total_steps, self.seed = cycles, total_steps, seed
        self._tokens = self.counts * np.array(self.lens)
        self.step, self.cycle = 0, -1
        self.remaining = np.zeros(len(self.lens), np.int64)
        self.taken = [0] * len(self.lens)  # chunks consumed per bucket, over all epochs
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # bucket -> (epoch, chunk order)

    def cycle_of(self, step: int) -> int:
        c = step * self.cycles // self.total_steps
        while cycle_start(c + 1, self.total_steps, self.cycles) <= step:
            c += 1
        while cycle_start(c, self.total_steps, self.cycles) > step:
            c -= 1
        return c

    def cycle_plan(self, cycle: int) -> np.ndarray:
        """Steps each bucket gets in ``cycle``."""
        steps = cycle_start(cycle + 1, self.total_steps, self.cycles) - cycle_start(cycle, self.total_steps, self.cycles)
        return steps_per_bucket(self._tokens, steps)

    def _pick_bucket(self) -> int:
        cycle = self.cycle_of(self.step)
        if cycle != self.cycle:
            self.cycle, self.remaining = cycle, self.cycle_plan(cycle)
        p = bucket_probabilities(self.odds, self.remaining)
        u = np.random.default_rng([self.seed, self.step]).random()
        b = min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(p) - 1)
        while self.remaining[b] == 0:  # float round-off at the top end of the cumulative sum
            b -= 1
        self.remaining[b] -= 1
        return b

    def _chunk_order(self, b: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(b)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, self.lens[b], epoch]).permutation(int(self.counts[b])))
            self._orders[b] = cached
        return cached[1]

    def _take_chunks(self, b: int, k: int) -> np.ndarray:
        n, first = int(self.counts[b]), self.taken[b]
        out = [self._chunk_order(b, e)[max(first, e * n) - e * n:min(first + k, (e + 1) * n) - e * n]
               for e in range(first // n, (first + k - 1) // n + 1)]
        self.taken[b] += k
        return np.concatenate(out)

    def next(self) -> tuple[int, np.ndarray]:
        b = self._pick_bucket()
        self.step += 1
        return self.lens[b], self._take_chunks(b, self.batch[b])

    def state_dict(self) -> dict:
        return {"step": self.step, "cycle": self.cycle, "remaining": [int(r) for r in self.remaining],
                "taken": list(self.taken)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.cycle = int(state["step"]), int(state["cycle"])
        self.remaining = np.array(state["remaining"], dtype=np.int64)
        self.taken = [int(t) for t in state["taken"]]
