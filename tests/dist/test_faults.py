"""Faults reach every rank as one line; barriers are named; resume skips damaged checkpoints."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqshard.dist.guard import RankFailure, named_barrier, shared_failure
from tests.helpers.ranks import run_ranks
from tests.helpers.training import ROOT, SMALL, assert_losses_close, read_metrics, train_rank


def fail_on_rank_one(rank):
    with pytest.raises(RankFailure) as caught:
        with shared_failure("loading data"):
            if rank == 1:
                raise ValueError("bad row 7\nsecond line")
    with shared_failure("a clean region"):
        pass  # no error anywhere: no exception
    return str(caught.value)


def cli_adaptive_unplannable(rank, world_size, out):
    """A 256-token document on groups of at most 2 x 64 tokens: the planner fails on rank 0."""
    from seqshard.launch.cli import main

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    sets = SMALL + [f"train.output_dir={out}", "parallel.sp_method=adaptive", "parallel.max_sp=2",
                    "parallel.planner.memory_tokens=64", "train.steps=1"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", str(ROOT / "examples" / "tiny.yaml"), *[a for s in sets for a in ("--set", s)]])
    return rc, err.getvalue()


def cli_bad_row(rank, world_size, out):
    """Line 3 of the corpus has no text (validate peeks at line 1 only): reported once, by line."""
    from seqshard.launch.cli import main

    data = Path(out) / "corpus.jsonl"
    if rank == 0:
        data.write_text('{"text": "a document"}\n{"text": "another"}\n{"title": "no text"}\n')
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    sets = SMALL + [f"train.output_dir={out}/run", f"data.source={data}", f"data.cache_dir={out}/cache",
                    "data.max_seq_len=16", "data.tokens_per_step=32"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", str(ROOT / "examples" / "tiny.yaml"), *[a for s in sets for a in ("--set", s)]])
    return rc, err.getvalue()


def barrier_with_absent_rank(rank):
    if rank == 1:
        time.sleep(4)  # never enters the barrier
        return ""
    from seqshard.dist.comm_stats import CollectiveError

    with pytest.raises(CollectiveError) as caught:
        named_barrier("checkpoint.written", timeout_s=1)
    return str(caught.value)


def fault_checks(rank, world_size, out):
    """One spawn for three checks (the barrier one last: it leaves the group timed out)."""
    return (fail_on_rank_one(rank), cli_adaptive_unplannable(rank, world_size, out),
            cli_bad_row(rank, world_size, out), barrier_with_absent_rank(rank))


def test_errors_reach_every_rank_as_one_line_and_barriers_are_named(tmp_path):
    rank0, rank1 = run_ranks(2, fault_checks, str(tmp_path), timeout=180)
    (guard0, (rc0, err0), (data_rc0, data_err0), barrier0), (guard1, (rc1, err1), (data_rc1, data_err1), _) = \
        rank0, rank1
    # an error raised on rank 1 only is raised on both, named by rank and region, first line only
    assert guard0 == guard1 == "rank 1: loading data: ValueError: bad row 7"
    # the adaptive planner failing on rank 0 ends both ranks promptly; rank 0 prints one line
    assert rc0 == rc1 == 1
    lines = [line for line in err0.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("seqshard: error: rank 0: adaptive plan: ValueError: "
                                                   "sequence"), err0
    assert "Traceback" not in err0 and "error" not in err1
    # a document without text: one line on rank 0 naming the file and line, nothing on rank 1
    assert data_rc0 == data_rc1 == 1
    assert data_err0.strip() == (f"seqshard: error: rank 0: loading data: DataError: {tmp_path / 'corpus.jsonl'} "
                                 "line 3: field 'text' is NoneType, not text"), data_err0
    assert data_err1 == ""
    # a checkpoint barrier that a rank never reaches fails under its name, not as a silent hang
    assert barrier0.startswith("rank 0: collective 'checkpoint.written'"), barrier0


def test_single_process_run_removes_its_rendezvous_folder(tmp_path):
    code = "from seqshard.dist.bootstrap import init_distributed; init_distributed(30)"
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID"):
        env.pop(key, None)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not list(tmp_path.glob("seqshard-pg-*"))


def _train_and_resume(rank, world_size, out):
    """Uninterrupted 5 steps (checkpoint every step), then two copies cut back to step 3 with
    step 3 damaged (a truncated .distcp / trainer.json) resume and must replay steps 3-5."""
    import torch.distributed as dist

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("seqshard").addHandler(handler)
    full, sets = Path(out) / "full", ["train.checkpoint_every=1"]
    reference = train_rank(rank, world_size, str(full), sets)
    cases = {"distcp": "__0_0.distcp", "json": "trainer.json"}
    if rank == 0:
        for case, name in cases.items():
            copy = Path(out) / case
            shutil.copytree(full, copy)
            for step in (4, 5):
                shutil.rmtree(copy / "checkpoints" / f"step_{step}")
            victim = copy / "checkpoints" / "step_3" / name
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    dist.barrier()
    resumed = {case: train_rank(rank, world_size, str(Path(out) / case), sets, {"resume": True})
               for case in cases}
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    return reference, resumed, warnings


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path):
    results = run_ranks(2, _train_and_resume, str(tmp_path), timeout=240)
    for reference, resumed, _ in results:
        for case in ("distcp", "json"):
            assert_losses_close(resumed[case], reference[2:])
    warnings = results[0][2]
    assert len(warnings) == 2 and all("checkpoint step 3" in w for w in warnings), warnings
    assert "__0_0.distcp: truncated" in warnings[0] and "trainer.json: JSONDecodeError" in warnings[1]
    assert results[1][2] == []  # reported on rank 0 only
    assert [m["step"] for m in read_metrics(tmp_path / "distcp")] == [1, 2, 3, 4, 5]
