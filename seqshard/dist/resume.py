"""Resume from the newest checkpoint that loads (DESIGN.md invariant 7).

:func:`resume_from_newest_loadable` walks the complete ``step_<N>`` folders newest first. For
each, every rank checks the files it can check cheaply (``trainer.json`` parses, every DCP
``.distcp`` file is as long as its ``.metadata`` says) and then calls the engine's ``load``;
the ranks agree on the outcome with one all-reduce, so they either all use this checkpoint or
all fall back to the previous one. A damaged checkpoint is reported on rank 0 with its step,
file and reason. The engine's ``load`` (torch, FSDP2, DeepSpeed) is passed in unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import MARKER, _STEP_DIR, CheckpointMismatch, checkpoint_root
from .comm_stats import record


class DamagedCheckpoint(RuntimeError):
    """A complete-marked checkpoint that cannot be loaded: the message names the file and why."""


def complete_checkpoints(output_dir) -> list[Path]:
    """Every ``step_<N>`` folder holding the COMPLETE marker, newest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    done = [(int(m.group(1)), p) for p in root.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(done, reverse=True)]


def verify_checkpoint(path: Path) -> None:
    """Raise DamagedCheckpoint naming the first file that is unreadable or shorter than recorded."""
    state_file = path / "trainer.json"
    try:
        json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        raise DamagedCheckpoint(f"{state_file.name}: {type(err).__name__}: {err}") from err
    if not (path / ".metadata").is_file():
        return  # not a DCP checkpoint (DeepSpeed's own layout): the engine's load decides
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DamagedCheckpoint(f".metadata: {type(err).__name__}: {err}") from err
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        have = file.stat().st_size if file.is_file() else -1
        if have < size:
            reason = "missing" if have < 0 else f"truncated: {have} bytes, the metadata records {size}"
            raise DamagedCheckpoint(f"{name}: {reason}")


def _agree(ok: bool) -> bool:
    """True only if every rank says ok."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    with record("resume.agree", 8):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _is_damage(err: BaseException) -> bool:
    """An unpickling / short-read / bad-archive failure (the files), not a model that differs."""
    import pickle
    import zipfile

    if isinstance(err, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError)):
        return True
    text = str(err)
    return any(s in text for s in ("unpickl", "PytorchStreamReader", "invalid load key", "truncated",
                                   "unexpected EOF", "corrupt"))


def resume_from_newest_loadable(output_dir, load, log=None):
    """Load the newest checkpoint every rank can load with ``load(path) -> trainer_state``.

    Returns ``(path, trainer_state)``, or ``(None, None)`` when the folder holds no complete
    checkpoint. A damaged one (a file missing, short or unreadable) is skipped with a warning
    (``log`` is rank 0's logger, or None elsewhere). A checkpoint whose files are intact but do
    not load into this run is a :class:`CheckpointMismatch` (the spec changed; the CLI exits 2):
    falling back to an older one would fail the same way and end by training over the run.
    When every complete checkpoint is damaged, that is a CheckpointMismatch too, naming each:
    starting at step 0 would overwrite them.
    """
    skipped = []
    for path in complete_checkpoints(output_dir):
        reason, state = None, None
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as err:
            reason = str(err)
        if _agree(reason is None):
            mismatch = None
            try:
                state = load(path)
            except CheckpointMismatch:
                raise  # not damage: the model changed, and every older checkpoint has the same shapes
            except Exception as err:  # noqa: BLE001 - classified, then agreed on by every rank
                # load_state_dict's first line is only a header; its missing/unexpected keys follow
                first = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
                first = first if len(first) <= 400 else first[:397] + "..."
                reason = f"load failed: {type(err).__name__}: {first}"
                mismatch = None if _is_damage(err) else reason
            if not _agree(mismatch is None):
                raise CheckpointMismatch(f"checkpoint {path} is intact but does not load into this run "
                                         f"({mismatch or 'on another rank'}); resume with the spec it was "
                                         "saved with, or start a new train.output_dir")
            if _agree(reason is None):
                return path, state
        reason = reason or "another rank could not load it"
        skipped.append(f"step_{_step_of(path)} ({reason})")
        if log is not None:
            log.warning("checkpoint step %d (%s) is damaged and skipped: %s", _step_of(path), path, reason)
    if skipped:
        raise CheckpointMismatch(f"no checkpoint under {checkpoint_root(output_dir)} loads: {'; '.join(skipped)}; "
                                 "nothing was changed (starting at step 0 would overwrite them): restore one, "
                                 "or start over with --overwrite")
    return None, None
