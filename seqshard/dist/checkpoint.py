"""Checkpoints through ``torch.distributed.checkpoint`` that are complete or ignored (invariant 7).

Layout: ``<output_dir>/checkpoints/step_<N>/`` holds the DCP shards of model and optimizer,
``trainer.json`` (step, LR schedule, data position, anything JSON) and ``rng_<rank>.pt``.
A save writes everything into ``.partial_step_<N>/`` first; only when every rank has finished
does rank 0 write the ``COMPLETE`` marker and rename the folder to ``step_<N>`` (an atomic
rename on POSIX file systems). A crash at any point leaves at most a ``.partial_*`` folder,
which resume ignores: the newest complete checkpoint is always intact.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .guard import named_barrier, raise_on_all_ranks

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Test hook: exit hard after the shards are written but before the checkpoint is committed.
_CRASH_ENV = "SEQSHARD_TEST_CRASH_DURING_SAVE"


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir) -> Path | None:
    """The newest ``step_<N>`` folder holding the COMPLETE marker, or None."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return max(done)[1] if done else None


class CheckpointSpaceError(OSError):
    """No room for a checkpoint: the message names the folder, the size needed and what is free."""


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def estimate_bytes(output_dir, model=None, optimizer=None) -> int:
    """The size the next checkpoint will take: the newest committed one's (measured), else the
    model's and optimizer's tensors on this rank times the world size (an upper bound)."""
    newest = latest_checkpoint(output_dir)
    if newest is not None:
        return folder_bytes(newest)
    tensors = list(model.state_dict().values()) if model is not None else []
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values()]
    local = sum(getattr(t, "_local_tensor", t).nbytes for t in tensors if isinstance(t, torch.Tensor))
    return local * dist.get_world_size()


def check_free_space(root: Path, need: int, step: int) -> None:
    free = shutil.disk_usage(root).free
    if free < need:
        raise CheckpointSpaceError(28, f"no room for checkpoint step_{step} in {root}: it needs about "
                                   f"{need / 2**20:.1f} MB, {free / 2**20:.1f} MB are free; free space there "
                                   "or set train.keep_checkpoints (the newest complete checkpoint is intact)")


def commit_checkpoint(output_dir, step: int, write, trainer_state: dict, need_bytes: int = 0) -> Path:
    """Run ``write(partial_dir)`` on every rank, then commit ``step_<N>`` atomically on rank 0.

    A failure on any rank while writing (no space, a dead peer inside DCP's own collectives) is
    raised on every rank as one RankFailure naming the step, after rank 0 removed the partial
    folder; the newest complete checkpoint is untouched. ``need_bytes`` is checked against the
    free space before anything is written."""
    root = checkpoint_root(output_dir)
    final, partial = root / f"step_{step}", root / f".partial_step_{step}"
    rank = dist.get_rank()
    error = None
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            check_free_space(root, need_bytes, step)
        except CheckpointSpaceError as err:
            error = err
    named_barrier("checkpoint.start")
    raise_on_all_ranks(f"checkpoint step {step}", error, on_failure=lambda: _drop_partial(partial))
    try:
        write(partial)
        torch.save(torch.get_rng_state(), partial / f"rng_{rank}.pt")
    except Exception as err:  # noqa: BLE001 - shared with every rank, then raised everywhere
        error = _space_error(err, root, need_bytes, step)
    raise_on_all_ranks(f"checkpoint step {step}", error, on_failure=lambda: _drop_partial(partial))
    return _commit(partial, final, step, trainer_state)


def _drop_partial(partial: Path) -> None:
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)


def _space_error(err: BaseException, root: Path, need: int, step: int) -> BaseException:
    """ENOSPC anywhere in the cause chain (DCP wraps its writers' errors) -> CheckpointSpaceError."""
    cause, seen = err, 0
    while cause is not None and seen < 10:
        if isinstance(cause, OSError) and cause.errno == 28 or "No space left" in str(cause):
            free = shutil.disk_usage(root).free
            return CheckpointSpaceError(28, f"the disk filled while writing checkpoint step_{step} in {root} "
                                        f"(about {need / 2**20:.1f} MB needed, {free / 2**20:.1f} MB free now); "
                                        "the partial folder was removed and the newest complete checkpoint is "
                                        "intact: free space there or set train.keep_checkpoints")
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return err


def _commit(partial: Path, final: Path, step: int, trainer_state: dict) -> Path:
    """Once every rank has written its shards: marker, then the atomic rename (rank 0)."""
    if os.environ.get(_CRASH_ENV) == str(step):
        os._exit(17)
    named_barrier("checkpoint.written")
    if dist.get_rank() == 0:
        (partial / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        (partial / MARKER).write_text(f"step {step}\n")
        if final.exists():  # a damaged step_<N> that resume skipped: kept aside, never deleted
            os.replace(final, _free_name(final.parent / f".replaced_{final.name}"))
        os.replace(partial, final)
    named_barrier("checkpoint.committed")
    return final


def _free_name(path: Path) -> Path:
    n = 1
    while (candidate := path.with_name(f"{path.name}.{n}")).exists():
        n += 1
    return candidate


def prune_checkpoints(output_dir, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` committed checkpoints (``train.keep_checkpoints``);
    returns the removed folders. Rank 0, after a commit."""
    root = checkpoint_root(output_dir)
    done = sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file())
    removed = [p for _, p in done[:-keep]] if keep and len(done) > keep else []
    for path in removed:
        doomed = root / f".removing_{path.name}"
        os.replace(path, doomed)  # atomic: never a half-deleted folder under a step_<N> name
        shutil.rmtree(doomed, ignore_errors=True)
    return removed


def read_trainer_state(path: Path) -> dict:
    """This rank's RNG is restored; the trainer state (step, data position) is returned."""
    rng = path / f"rng_{dist.get_rank()}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng))
    return json.loads((path / "trainer.json").read_text())


def expert_shards(model) -> dict:
    """``{state-dict name: ExpertShard}`` of the expert tensors this rank holds a slice of under
    expert parallelism (parallel/ep.py; modules carrying ``ep_shard``); {} without it."""
    return {f"{name}.{p}": m.ep_shard for name, m in model.named_modules()
            if getattr(m, "ep_shard", None) is not None for p in ("gate_up", "down")}


def with_global_experts(model, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
    """Expert-parallel slices as DTensors sharded by global expert index (``Shard(0)`` over the
    ``ep`` dim, replicated over ``ep_replica``), in the model and AdamW state dicts: DCP then stores
    each expert tensor once, as the full ``[E, ...]`` tensor, and loads it into any ``parallel.ep``
    (or none). Without EP the state dicts are returned unchanged."""
    shards = expert_shards(model)
    if not shards:
        return model_sd, optim_sd
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def wrap(t, shard):
        return DTensor.from_local(t, shard.mesh, [Replicate(), Shard(0)], run_check=False)

    model_sd = {k: wrap(v, shards[k]) if k in shards else v for k, v in model_sd.items()}
    state = dict(optim_sd.get("state", {}))
    for name, shard in shards.items():
        if name in state:
            param_shape = model_sd[name].to_local().shape
            state[name] = {k: wrap(v, shard) if isinstance(v, torch.Tensor) and v.shape == param_shape else v
                           for k, v in state[name].items()}
    return model_sd, {**optim_sd, "state": state}


def local_experts(model, state: dict) -> dict:
    """The inverse of ``with_global_experts`` after a load: each expert DTensor back to this rank's
    slice. Only the expert entries: FSDP2's own DTensors (every parameter and its AdamW moments)
    must stay DTensors, or ``set_state_dict`` meets a local shard where it wants the global shape."""
    shards = expert_shards(model)
    if not shards:
        return state

    def unwrap(v):
        return v.to_local() if hasattr(v, "to_local") else v

    model_sd = {k: unwrap(v) if k in shards else v for k, v in state["model"].items()}
    optim = dict(state["optim"])
    moments = dict(optim.get("state", {}))
    for name in shards:
        if name in moments:
            moments[name] = {k: unwrap(v) for k, v in moments[name].items()}
    return {**state, "model": model_sd, "optim": {**optim, "state": moments}}


def save_checkpoint(output_dir, step: int, model, optimizer, trainer_state: dict) -> Path:
    """DCP save of model and optimizer (sharded per rank), committed atomically."""
    def write(partial):
        model_sd, optim_sd = with_global_experts(model, *get_state_dict(model, optimizer))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))

    return commit_checkpoint(output_dir, step, write, trainer_state, estimate_bytes(output_dir, model, optimizer))


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG in place; return the trainer state."""
    model_sd, optim_sd = with_global_experts(model, *get_state_dict(model, optimizer))
    check_reshardable(path, model_sd)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    state = local_experts(model, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_trainer_state(path)


_ASYNC_GROUP = {}  # one gloo group for DCP's background collectives, per default group


def save_checkpoint_async(output_dir, step: int, model, optimizer, trainer_state: dict):
    """``dcp.async_save`` into ``.partial_step_<N>/``; returns ``finish() -> Path``, a collective
    that waits for this rank's write and then commits like ``commit_checkpoint``: the rename
    happens only after the save finished on every rank, so a partial save is never picked up.
    The background write uses its own gloo group, so training collectives cannot interleave."""
    root = checkpoint_root(output_dir)
    final, partial = root / f"step_{step}", root / f".partial_step_{step}"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    key = id(dist.group.WORLD)
    if key not in _ASYNC_GROUP:
        _ASYNC_GROUP[key] = dist.new_group(backend="gloo")
    model_sd, optim_sd = with_global_experts(model, *get_state_dict(model, optimizer))
    future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial),
                            process_group=_ASYNC_GROUP[key])
    torch.save(torch.get_rng_state(), partial / f"rng_{dist.get_rank()}.pt")

    def finish() -> Path:
        future.result()
        return _commit(partial, final, step, trainer_state)

    return finish


class CheckpointMismatch(ValueError):
    """A checkpoint whose tensors do not fit the model being resumed (the CLI exits 2)."""

    exit_code = 2


def check_reshardable(path: Path, model_sd: dict) -> None:
    """DCP reshards any layout of the same tensors; a changed model shape cannot be. Compare
    the saved global shapes with the model's and name every difference, before loading."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k[len("model."):]: tuple(v.size) for k, v in meta.items()
             if k.startswith("model.") and hasattr(v, "size")}
    here = {k: tuple(v.shape) for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
    diffs = [f"{k} is {list(saved[k])} there, {list(here[k])} here"
             for k in sorted(saved.keys() & here.keys()) if saved[k] != here[k]]
    diffs += [f"{k} is missing from it" for k in sorted(here.keys() - saved.keys())]
    diffs += [f"{k} is not in this model" for k in sorted(saved.keys() - here.keys())]
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointMismatch(f"checkpoint {path} cannot be resharded into this model: "
                                 f"{'; '.join(diffs[:3])}{more}; resume with the model.* keys it was saved with")
