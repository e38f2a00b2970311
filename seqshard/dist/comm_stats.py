"""Per-process accounting of collectives: bytes sent and seconds spent, by operation name.

Every collective seqshard issues in the forward or backward pass runs inside
``record(op, nbytes)``. Benchmarks read ``snapshot()`` to compare measured bytes with each
method's analytic minimum; the trainer writes the per-step totals into ``metrics.jsonl``.
The record also turns a collective that fails or times out (a dead peer, a hung rank) into an
error naming this rank and the operation, and the first failure a dead peer published
(``cause.py``), if any.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch.distributed as dist

from .cause import first_failure, stalled_ranks


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank and the operation."""


class CommLog:
    def __init__(self):
        self.reset()

    def reset(self):
        self.calls = defaultdict(int)
        self.bytes = defaultdict(int)
        self.seconds = defaultdict(float)

    def add(self, op, nbytes, seconds):
        self.calls[op] += 1
        self.bytes[op] += int(nbytes)
        self.seconds[op] += seconds

    def snapshot(self):
        """``{op: {"calls", "bytes", "seconds"}}`` plus a ``"total"`` entry."""
        out = {op: {"calls": self.calls[op], "bytes": self.bytes[op], "seconds": self.seconds[op]}
               for op in sorted(self.calls)}
        out["total"] = {"calls": sum(self.calls.values()), "bytes": sum(self.bytes.values()),
                        "seconds": sum(self.seconds.values())}
        return out


COMM_LOG = CommLog()  # process-local statistics only; never a process group


@contextmanager
def record(op: str, nbytes: int):
    """Time a (synchronous) collective and count ``nbytes`` sent by this rank."""
    start = time.perf_counter()
    try:
        yield
    except RuntimeError as err:
        rank = dist.get_rank() if dist.is_initialized() else 0
        first = first_failure()  # a peer that died may have named its cause (read only on this error path)
        cause = f" [first failure: {first}]" if first and not first.startswith(f"rank {rank}:") else ""
        if not cause and (stalled := stalled_ranks()):
            cause = f" [stalled: {stalled}]"
        raise CollectiveError(
            f"rank {rank}: collective '{op}' ({nbytes} bytes) failed or timed out "
            f"after {time.perf_counter() - start:.1f}s{cause}: {str(err).splitlines()[0] if str(err) else err!r}"
        ) from err
    COMM_LOG.add(op, nbytes, time.perf_counter() - start)
