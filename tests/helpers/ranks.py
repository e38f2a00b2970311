"""Run a function on N real gloo ranks in spawned processes (STYLE rule 8).

``run_ranks(4, fn, *args)`` starts 4 processes, each with a gloo process group rendezvoused
through a ``file://`` store in a fresh temp dir, calls ``fn(rank, world_size, *args)`` and
returns the list of per-rank return values (which must be picklable). A rank that raises
has its traceback re-raised in the test; a run past ``timeout`` seconds fails.
``collective_timeout`` (seconds) bounds every collective of the process group, so a test of a
shape that used to hang fails fast with the rank's CollectiveError instead of waiting 120 s.
``fn`` must be importable (defined at module level of a test module).
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def _worker(rank, world_size, init_file, fn, args, queue, collective_timeout=120):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=collective_timeout))
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - re-raised in the parent with the traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size, fn, *args, timeout=300, collective_timeout=120):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue, collective_timeout))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size and not errors:
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise TimeoutError(f"run_ranks({world_size}, {fn.__name__}) exceeded {timeout}s; "
                                   f"finished ranks: {sorted(results)}")
            if not queue.empty():
                rank, status, payload = queue.get()
                (results if status == "ok" else errors)[rank] = payload
                continue
            for r, p in enumerate(procs):  # a rank that died without reporting (crash, os._exit)
                if p.exitcode not in (None, 0) and r not in results and queue.empty():
                    errors[r] = f"process exited with code {p.exitcode} without a result"
            time.sleep(0.05)
        if errors:  # the first failure often makes its peers fail too: report the root cause
            time.sleep(1.0)
            while not queue.empty():
                rank, status, payload = queue.get()
                (results if status == "ok" else errors)[rank] = payload
            for r, p in enumerate(procs):
                if p.exitcode not in (None, 0) and r not in results and r not in errors:
                    errors[r] = f"process exited with code {p.exitcode} without a result"
        for p in procs:
            p.join(timeout=1 if errors else 10)
            if p.is_alive():
                p.kill()
        if errors:
            silent = [r for r, e in errors.items() if e.startswith("process exited")]
            rank = min(silent) if silent else min(errors)
            others = sorted(set(errors) - {rank})
            raise AssertionError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{errors[rank]}"
                                 + (f"\n(ranks {others} failed too)" if others else ""))
        return [results[r] for r in range(world_size)]
