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
BEAT_S, FROZEN_S = 1.0, 5.0  # a live rank publishes every second; one silent 5 s is frozen (SIGSTOP, dead)


class _Heartbeat:
    """A daemon thread that publishes this rank's progress marker, pid, host and the time to the
    store every second. The marker is set by the main thread for free (``heartbeat(what)``); the
    thread keeps beating while the main thread waits in a collective, so a rank whose beats stop
    is frozen or dead, and a rank whose marker lags is behind."""

    def __init__(self):
        self.at, self.thread, self.stop = "start", None, None

    def start(self):
        import threading

        if self.thread is not None or _store() is None or dist.get_world_size() == 1:
            return
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(_store(), dist.get_rank(), self.stop),
                                       name="seqshard-heartbeat", daemon=True)
        self.thread.start()

    def _run(self, store, rank, stop):
        import json
        import os
        import socket
        import time

        host, pid = socket.gethostname(), os.getpid()
        while not stop.is_set():
            try:
                store.set(f"{HEARTBEAT}{rank}", json.dumps({"at": self.at, "time": time.time(), "pid": pid,
                                                            "host": host}))
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return
            stop.wait(BEAT_S)

    def end(self):
        if self.thread is not None:
            self.stop.set()
            self.thread.join(timeout=5)
            self.thread = None


_BEAT = _Heartbeat()


def start_heartbeat() -> None:
    """Start this rank's heartbeat thread (idempotent; nothing in a 1-rank job)."""
    _BEAT.start()


def stop_heartbeat() -> None:
    _BEAT.end()


def heartbeat(what: str) -> None:
    """Say where this rank is (``what``, e.g. "step 7"): published by the heartbeat thread."""
    _BEAT.at = what


def _step_of(at: str) -> float:
    import re

    m = re.search(r"(\d+)", at or "")
    return float(m.group(1)) if m else -1.0


def process_state(pid: int) -> str | None:
    """``"stopped"`` (a thread is stopped: SIGSTOP, a debugger), ``"running"`` (a thread is
    running or waiting for a CPU: alive, perhaps starved on a loaded host) or ``"sleeping"``
    (every thread waits: a hang), from ``/proc/PID/task/*/stat``; None when unreadable."""
    import glob

    states = []
    for path in glob.glob(f"/proc/{int(pid)}/task/*/stat"):
        try:
            with open(path) as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue
    if not states:
        return None
    if any(s in "Tt" for s in states):
        return "stopped"
    return "running" if "R" in states else "sleeping"


def stalled_ranks(kill_frozen: bool = True) -> str | None:
    """On a collective's error path: the ranks that stopped (no heartbeat for FROZEN_S: SIGSTOP,
    a dead host) or lag behind the others' progress marker, e.g. "rank 1 (pid 123 on h1) frozen
    at step 4, silent for 9 s"; None when nothing stands out. A frozen rank on this host is
    killed (``kill_frozen``): it cannot leave by itself, and the launcher would wait for it."""
    store = _store()
    if store is None:
        return None
    import json
    import os
    import signal
    import socket
    import time

    try:
        keys = [f"{HEARTBEAT}{r}" for r in range(dist.get_world_size())]
        beats = {r: json.loads(store.get(k)) for r, k in enumerate(keys) if store.check([k])}
    except Exception:  # noqa: BLE001 - best effort on a path that is already failing
        return None
    if len(beats) < 2:
        return None
    now, me, host = time.time(), dist.get_rank(), socket.gethostname()
    silent = sorted(r for r, b in beats.items() if r != me and now - b["time"] > FROZEN_S)
    # a silent rank on this host that is still running is starved (a loaded host), not frozen
    local = {r: process_state(beats[r]["pid"]) for r in silent if beats[r].get("host") == host}
    starved = [r for r in silent if local.get(r) == "running"]
    frozen = [r for r in silent if r not in starved]
    lead = max(_step_of(b["at"]) for b in beats.values())
    behind = sorted(r for r, b in beats.items() if r not in silent and _step_of(b["at"]) < lead)
    notes = []
    for r in frozen:
        b, killed = beats[r], ""
        if kill_frozen and b.get("host") == host:
            try:
                os.kill(int(b["pid"]), signal.SIGKILL)
                killed = "; killed it"
            except (OSError, ValueError):
                pass
        how = f" ({local[r]})" if local.get(r) else ""
        notes.append(f"rank {r} (pid {b['pid']} on {b['host']}) frozen{how} at {b['at']}, silent for "
                     f"{now - b['time']:.0f} s{killed}")
    notes += [f"rank {r} (pid {beats[r]['pid']} on {beats[r]['host']}) heartbeat {now - beats[r]['time']:.0f} s "
              f"late but still running (a loaded host?), not killed" for r in starved]
    notes += [f"rank {r} (pid {beats[r]['pid']} on {beats[r]['host']}) behind, at {beats[r]['at']}" for r in behind]
    return "; ".join(notes) or None
