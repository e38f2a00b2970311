"""Who may write a run folder, and what a resume may change (DESIGN.md invariant 11).

- **One writer per run.** Rank 0 holds an exclusive ``fcntl`` lock on
  ``<output_dir>/.seqshard.lock`` for the whole run; the file records the holder (host, pid,
  start time, job id). A second job on the same folder is refused in one line naming the
  holder. The kernel releases the lock when its process dies, however it dies, so a lock file
  left by a dead job is taken over with a message (no stale-lock guessing by age or pid).
- **A folder that holds a run is never started over silently.** Without ``--resume`` a folder
  with metrics or checkpoints is refused unless ``--overwrite`` says to start over (which then
  removes the old checkpoints and metrics, and says so).
- **Resume keeps what trained the run.** The spec a checkpoint was saved with (recorded in its
  ``trainer.json``) is compared key by key with the resuming spec: a key that changes what is
  trained (seed, model, data) is refused naming the key; a key that is safe to change (layout,
  engine of the same checkpoint format, schedule, logging) is reported.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_NAME = ".seqshard.lock"


class RunDirError(ValueError):
    """The run folder cannot be used as asked (the CLI exits 2; nothing was changed)."""

    exit_code = 2


class RunLock:
    """An exclusive lock on ``<output_dir>/.seqshard.lock`` held by this process until ``release``."""

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd = None
        self.previous = None  # the record a dead holder left behind, when one was taken over

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_record(fd)
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by another job ({_describe(holder)}); two jobs "
                              "cannot write one run: wait for it, stop it, or use another train.output_dir") from None
        self.previous = _read_record(fd) or None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or ""}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # an empty record: released cleanly (a dead holder leaves its record)
        os.close(self.fd)  # closing drops the lock
        self.fd = None


def _read_record(fd) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or holder.get("unreadable"):
        return "holder unknown"
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')} since {holder.get('started')}{job}"


def describe_takeover(lock: RunLock) -> str | None:
    """The message for a lock file a dead job left behind, or None."""
    if not lock.previous:
        return None
    return (f"{lock.path}: the previous holder ({_describe(lock.previous)}) is gone without releasing it; "
            "taking the run over")


def existing_run(output_dir) -> str | None:
    """A description of the run ``output_dir`` holds (metrics steps, checkpoints), or None."""
    from seqshard.dist.checkpoint import checkpoint_root

    out = Path(output_dir)
    parts = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        parts.append("metrics.jsonl")
    root = checkpoint_root(out)
    steps = sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) if root.is_dir() else []
    if steps:
        parts.append(f"checkpoints {', '.join(steps[:4])}{' ...' if len(steps) > 4 else ''}")
    return " and ".join(parts) or None


def claim_output_dir(output_dir, resume: bool, overwrite: bool, log=None) -> RunLock:
    """Rank 0, before anything is written: take the lock, then refuse to start over a run unless
    asked. Returns the held lock (release it when the run ends)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"train.output_dir: {out} is a file, not a folder")
    lock = RunLock(out).acquire()
    try:
        if log is not None and (msg := describe_takeover(lock)):
            log.warning(msg)
        held = existing_run(out)
        if held and not resume:
            if not overwrite:
                raise RunDirError(f"{out} holds a run ({held}); continue it with --resume, start over with "
                                  "--overwrite (deletes its checkpoints and metrics), or choose another train.output_dir")
            from seqshard.dist.checkpoint import checkpoint_root

            shutil.rmtree(checkpoint_root(out), ignore_errors=True)
            for name in ("metrics.jsonl", "metrics.replaced.jsonl"):
                (out / name).unlink(missing_ok=True)
            if log is not None:
                log.warning("--overwrite: removed %s from %s", held, out)
    except BaseException:
        lock.release()
        raise
    return lock


# Spec keys a resume may not change: they decide the weights' shapes, the data seen, its order.
# Every other key (layout, engine, schedule, logging, checkpointing, memory) is reported only.
FIXED_PREFIXES = ("seed", "model.", "data.")
SAFE_DATA_PREFIXES = ("data.micro_batch_tokens", "data.num_proc", "data.cache_dir", "data.eval.")


def changed_keys(saved: dict, current: dict, defaults: dict | None = None) -> list[tuple[str, object, object]]:
    """``(key.path, saved value, current value)`` for every leaf that differs; a key the saved spec
    lacks (recorded by an older seqshard) counts as its value in ``defaults``."""
    def leaves(d, prefix=""):
        for k, v in d.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict):
                yield from leaves(v, path + ".")
            else:
                yield path, v

    a, b = dict(leaves(saved)), dict(leaves(current))
    a = {**{k: v for k, v in dict(leaves(defaults or {})).items() if k in b}, **a}
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def recorded_spec(output_dir) -> tuple[Path, dict] | None:
    """(checkpoint, spec) of the newest complete checkpoint whose trainer.json records a spec."""
    from seqshard.dist.resume import complete_checkpoints

    for path in complete_checkpoints(output_dir):
        try:
            spec = json.loads((path / "trainer.json").read_text()).get("spec")
        except (OSError, ValueError, AttributeError):
            continue  # damaged: resume reports it
        if isinstance(spec, dict):
            return path, spec
    return None


def check_resume_spec(saved: dict | None, current: dict, checkpoint: Path, defaults: dict | None = None) -> list[str]:
    """Raise RunDirError naming the first key that may not change; return the safe changes.
    ``defaults``: the spec's default values, for keys added since ``saved`` was recorded."""
    if not saved:
        return []  # a checkpoint of an older seqshard: nothing recorded to compare
    changes = changed_keys(saved, current, defaults)
    fixed = [c for c in changes if c[0].startswith(FIXED_PREFIXES) and not c[0].startswith(SAFE_DATA_PREFIXES)]
    if fixed:
        key, was, now = fixed[0]
        more = f" (and {', '.join(c[0] for c in fixed[1:])})" if len(fixed) > 1 else ""
        raise RunDirError(f"{key}: {now!r} differs from {was!r}, which {checkpoint} was trained with{more}; "
                          "resume with the spec the run was saved with, or start a new train.output_dir")
    if saved.get("train", {}).get("engine") != current.get("train", {}).get("engine") and "deepspeed" in (
            saved.get("train", {}).get("engine"), current.get("train", {}).get("engine")):
        raise RunDirError(f"train.engine: {current['train']['engine']!r} cannot read the "
                          f"{saved['train']['engine']!r} checkpoint {checkpoint} (DeepSpeed keeps its own format)")
    return [f"{k}: {was!r} -> {now!r}" for k, was, now in changes if k != "train.output_dir"]  # a moved folder
