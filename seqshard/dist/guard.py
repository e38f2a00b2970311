"""Errors on one rank reach every rank: guarded regions and named barriers.

A failure inside :func:`shared_failure` on any rank (the planner, data loading, a step, an OOM
caught by the caller) is shared through one small all-reduce of a flag, then an all-gather of
the messages, so every rank raises the same :class:`RankFailure` ("rank R: cause") instead of
leaving the others blocked in the next collective. Every rank of the group must enter the
region (it is a collective, DESIGN.md invariant 8). The CLI prints a RankFailure as one line
on rank 0 and exits 1.

    with shared_failure("plan"):
        plan = plan_step(...)          # may raise on rank 0 only

``raise_on_all_ranks(what, error_or_None)`` is the same agreement for code that already caught
its own exception (e.g. ``except torch.OutOfMemoryError as e: raise_on_all_ranks("step 3", e)``).
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .cause import describe
from .comm_stats import record


class RankFailure(RuntimeError):
    """An error raised on some rank(s), now raised on every rank with the same one-line message.
    ``exit_code`` is the cause's own (``exit_code`` attribute, e.g. 2 for a refused spec or run
    folder, whose message is then shown as it is), else 1."""

    def __init__(self, message: str, ranks: list[int], exit_code: int = 1):
        super().__init__(message)
        self.ranks, self.exit_code = ranks, exit_code


def _summary(what: str, error: BaseException) -> tuple[str, int]:
    """(one line, exit code): a user error (one with an ``exit_code``) is its own message."""
    code = getattr(error, "exit_code", 1)
    if code != 1:
        return str(error).splitlines()[0], code
    return f"{what}: {describe(error)}", 1


def raise_on_all_ranks(what: str, error: BaseException | None, group=None, on_failure=None) -> None:
    """Collective: if ``error`` is set on any rank, every rank raises one RankFailure naming the
    first failed rank and its cause (and how many others failed). A no-op when all succeeded.
    ``on_failure()`` runs on every rank before the raise (clean-up such as a partial folder)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:  # nobody to tell
        if error is not None:
            if on_failure is not None:
                on_failure()
            rank = dist.get_rank() if dist.is_initialized() else 0
            line, code = _summary(what, error)
            raise RankFailure(line if code != 1 else f"rank {rank}: {line}", [rank], code) from error
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    with record(f"guard.{what}", flag.numel() * 8):
        dist.all_reduce(flag, group=group)
    if int(flag.item()) == 0:
        return
    messages = [None] * dist.get_world_size(group)
    with record(f"guard.{what}.gather", 0):
        dist.all_gather_object(messages, None if error is None else _summary(what, error), group=group)
    failed = [r for r, m in enumerate(messages) if m is not None]
    if on_failure is not None:
        on_failure()
    rank = dist.get_global_rank(group, failed[0]) if group is not None else failed[0]
    line, code = messages[failed[0]]
    if code != 1:  # the same user error everywhere (a refused folder, spec): its own line
        raise RankFailure(line, failed, code) from error
    more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
    raise RankFailure(f"rank {rank}: {line}{more}", failed) from error


@contextmanager
def shared_failure(what: str, group=None):
    """Run the block on every rank; an exception on any rank is raised on all of them as a
    :class:`RankFailure`. KeyboardInterrupt and SystemExit pass through untouched, and so does a
    RankFailure from an inner region (every rank raised it already)."""
    error = None
    try:
        yield
    except RankFailure:
        raise  # already raised on every rank by an inner region
    except Exception as err:  # noqa: BLE001 - shared with every rank below, then re-raised
        error = err
    raise_on_all_ranks(what, error, group)


def named_barrier(op: str, timeout_s: float | None = None, group=None) -> None:
    """A barrier under the collective timeout whose failure names this rank and ``op``.
    On gloo, ``monitored_barrier`` also names the ranks that never arrived."""
    if dist.get_world_size(group) == 1:
        return
    with record(op, 0):
        if dist.get_backend(group) == dist.Backend.GLOO:
            kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
            dist.monitored_barrier(group=group, **kwargs)
        else:
            dist.barrier(group=group)
