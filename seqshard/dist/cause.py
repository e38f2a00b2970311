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
