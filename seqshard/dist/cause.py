"""The first failure of a job, left in the process group's store for the ranks it strands.

When a rank dies outside a guarded region (an exception in a forward pass, a kernel error) its
peers are typically inside an SP collective; on gloo that collective fails as soon as the dead
process's connections close ("Connection closed by peer"), but the error names only the waiting
rank and its collective. ``publish(what, err)`` (called on the failing rank's way out, by the
CLI) stores one line, ``"rank R: what: Type: first line"``, under one key of the default
process group's store (the rendezvous store every rank already shares); ``first_failure()``
reads it back, without waiting, on the error path of ``comm_stats.record``. Nothing runs on the
success path of any collective. Best effort: without a process group, or when the store itself
is gone (its host rank died), both do nothing.
"""
from __future__ import annotations

import torch.distributed as dist

KEY = "seqshard/first_failure"


def describe(err: BaseException) -> str:
    """``"Type: first line of the message"`` (``"Type"`` when the message is empty)."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _store():
    if not dist.is_initialized():
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        return None


def publish(what: str, err: BaseException) -> None:
    """Record ``"rank R: what: cause"`` as the job's first failure (an earlier one is kept)."""
    store = _store()
    if store is None:
        return
    line = f"rank {dist.get_rank()}: {what}: {describe(err)}"
    try:
        store.compare_set(KEY, "", line)  # sets only when no failure was recorded yet
    except Exception:  # noqa: BLE001 - best effort on a path that is already failing
        pass


def first_failure() -> str | None:
    """The line a failing rank published, or None (nothing published, no reachable store)."""
    store = _store()
    if store is None:
        return None
    try:
        return store.get(KEY).decode() if store.check([KEY]) else None
    except Exception:  # noqa: BLE001 - best effort on a path that is already failing
        return None


HEARTBEAT = "seqshard/heartbeat/"


def heartbeat(what: str) -> None:
    """Record where this rank is (``what``, e.g. "step 7"), when, and its pid/host, in the store:
    when a collective times out, :func:`stalled_ranks` names the rank that stopped moving."""
    store = _store()
    if store is None or dist.get_world_size() == 1:
        return
    import json
    import os
    import socket
    import time

    try:
        store.set(f"{HEARTBEAT}{dist.get_rank()}", json.dumps(
            {"at": what, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname()}))
    except Exception:  # noqa: BLE001 - best effort: a heartbeat never fails a step
        pass


def stalled_ranks() -> str | None:
    """On a collective's error path: the ranks whose heartbeat is the oldest, by more than a few
    seconds, e.g. "rank 1 (pid 123 on h1) last seen at step 4, 31 s ago"; None when every rank
    was seen recently or nothing was recorded."""
    store = _store()
    if store is None:
        return None
    import json
    import time

    try:
        keys = [f"{HEARTBEAT}{r}" for r in range(dist.get_world_size())]
        beats = {r: json.loads(store.get(k)) for r, k in enumerate(keys) if store.check([k])}
    except Exception:  # noqa: BLE001 - best effort on a path that is already failing
        return None
    if len(beats) < 2:
        return None
    now, newest = time.time(), max(b["time"] for b in beats.values())
    behind = sorted(r for r, b in beats.items() if newest - b["time"] > 2.0)
    if not behind:
        return None
    return "; ".join(f"rank {r} (pid {beats[r]['pid']} on {beats[r]['host']}) last seen at {beats[r]['at']}, "
                     f"{now - beats[r]['time']:.0f} s ago" for r in behind)
