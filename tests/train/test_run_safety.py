"""Nothing a user has is lost (issue 27): resume after a spec change, a second writer, a torn
metrics line, a non-finite run, SIGTERM, a full disk, the per-rank peak memory.

Each test runs the real CLI (``seqshard train``) as one process on a tiny spec (a few seconds)
and checks the exit code, the one line on stderr, and that the run folder is as it was.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqshard.train.rundir import RunDirError, claim_output_dir
from tests.helpers.ranks import run_ranks
from tests.helpers.training import ROOT, SMALL, read_metrics

TINY = str(ROOT / "examples" / "tiny.yaml")
FAST = SMALL + ["data.max_seq_len=128", "data.tokens_per_step=256", "model.dim=32", "model.ffn_dim=64",
                "train.steps=4", "train.checkpoint_every=2"]


def seqshard(out, *args, sets=(), timeout=240, wait=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "seqshard", "train", TINY, *args]
    for s in [*FAST, f"train.output_dir={out}", *sets]:
        cmd += ["--set", s]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def snapshot(out: Path) -> dict:
    """Every file of the run folder with its size and modification time."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".seqshard.lock"}


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("seqshard:")]


def test_resume_after_a_spec_change_refuses_and_keeps_everything(tmp_path):
    out = tmp_path / "run"
    assert seqshard(out).returncode == 0
    before = snapshot(out)
    for change, key in (("model.tie_embeddings=true", "model.tie_embeddings"), ("seed=1", "seed"),
                        ("data.batching=pack", "data.batching"), ("data.max_seq_len=64", "data.max_seq_len")):
        proc = seqshard(out, "--resume", sets=[change, "train.steps=6"])
        assert proc.returncode == 2, (change, proc.stderr[-2000:])
        (line,) = errors(proc)
        assert key in line and "Traceback" not in proc.stderr, line
        assert snapshot(out) == before, change  # not a byte changed: no checkpoint, no metrics line
    # a safe change (the layout of micro-batches, more steps) resumes and is reported
    proc = seqshard(out, "--resume", sets=["train.steps=6", "data.micro_batch_tokens=256"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data.micro_batch_tokens" in proc.stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    assert seqshard(out).returncode == 0
    before = snapshot(out)
    proc = seqshard(out)
    assert proc.returncode == 2
    (line,) = errors(proc)
    assert "holds a run" in line and "--resume" in line and "--overwrite" in line, line
    assert snapshot(out) == before
    proc = seqshard(out, "--overwrite", sets=["train.steps=2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]


def test_every_checkpoint_damaged_is_an_error_not_a_restart(tmp_path):
    out = tmp_path / "run"
    assert seqshard(out).returncode == 0
    for step in (2, 4):
        (out / "checkpoints" / f"step_{step}" / "trainer.json").write_text("{torn")
    before = snapshot(out)
    proc = seqshard(out, "--resume")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no checkpoint" in errors(proc)[0] and "step_4" in errors(proc)[0]
    assert snapshot(out) == before


def hold_lock(folder, ready):
    from seqshard.train.rundir import RunLock

    RunLock(folder).acquire()
    Path(ready).write_text("held")
    time.sleep(600)


def test_one_writer_per_run_folder_and_a_dead_holder_is_taken_over(tmp_path):
    import multiprocessing as mp

    out, ready = tmp_path / "run", tmp_path / "ready"
    holder = mp.get_context("spawn").Process(target=hold_lock, args=(str(out), str(ready)))
    holder.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(RunDirError, match=f"in use by another job .*pid {holder.pid}"):
            claim_output_dir(out, resume=False, overwrite=False)
        proc = seqshard(out)  # the CLI: one line, exit 2, before training
        assert proc.returncode == 2 and "in use by another job" in errors(proc)[0], proc.stderr[-2000:]
    finally:
        holder.kill()
        holder.join()
    messages = []

    class Log:
        def warning(self, msg, *args):
            messages.append(msg % args if args else msg)

    lock = claim_output_dir(out, resume=False, overwrite=False, log=Log())
    lock.release()
    assert len(messages) == 1 and f"pid {holder.pid}" in messages[0] and "taking the run over" in messages[0]


def test_a_torn_metrics_line_is_skipped_by_name(tmp_path):
    out = tmp_path / "run"
    assert seqshard(out).returncode == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a crash mid-write
    summary = subprocess.run([sys.executable, "-m", "seqshard", "summary", str(out)], capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert summary.returncode == 0 and "4 steps" in summary.stdout, summary.stderr
    assert "metrics.jsonl line 5" in summary.stderr
    proc = seqshard(out, "--resume", sets=["train.steps=6"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_a_nonfinite_run_never_exits_0(tmp_path):
    # lr 1e20 sends the weights to inf after the first update: every later step is non-finite
    proc = seqshard(tmp_path / "stop", sets=["train.lr=1e20", "train.warmup_steps=0", "train.grad_clip=0"])
    assert proc.returncode == 4, proc.stderr[-2000:]
    (line,) = errors(proc)
    assert "step 2" in line and "not finite" in line and "on_nonfinite" in line, line
    metrics = read_metrics(tmp_path / "stop")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["nonfinite"] is True
    assert not (tmp_path / "stop" / "checkpoints" / "step_2").exists()  # nothing saved after it
    proc = seqshard(tmp_path / "skip", sets=["train.lr=1e20", "train.warmup_steps=0", "train.grad_clip=0",
                                             "train.on_nonfinite=skip", "train.max_nonfinite_in_row=2",
                                             "train.steps=6"])
    assert proc.returncode == 4 and "2 non-finite steps in a row" in errors(proc)[0], proc.stderr[-2000:]
    assert [m.get("skipped_steps") for m in read_metrics(tmp_path / "skip")] == [None, 1, 2]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nonfinite_spec_floats_are_refused(tmp_path, value):
    proc = subprocess.run([sys.executable, "-m", "seqshard", "validate", TINY, "--set", f"train.lr={value}"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and proc.stderr.startswith("seqshard: error: train.lr: must be a finite number")


def test_sigterm_checkpoints_the_current_step_and_resume_loses_nothing(tmp_path):
    ref = seqshard(tmp_path / "ref", sets=["train.steps=8", "train.checkpoint_every=0"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "run"
    proc = seqshard(out, sets=["train.steps=8", "train.checkpoint_every=0", "train.log_every=1"], wait=False)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (out / "metrics.jsonl").exists() or \
            not (out / "metrics.jsonl").read_text().count("\n") >= 2:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    (line,) = [x for x in stderr.splitlines() if x.startswith("seqshard:")]
    assert "preempted by SIGTERM at step" in line and "--resume" in line, line
    stopped = int(line.split("at step ")[1].split(":")[0])
    assert stopped < 8 and (out / "checkpoints" / f"step_{stopped}" / "COMPLETE").is_file()
    assert [m["step"] for m in read_metrics(out)] == list(range(1, stopped + 1))  # 0 steps lost
    resumed = seqshard(out, "--resume", sets=["train.steps=8", "train.checkpoint_every=0"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["loss"] for m in read_metrics(out)] == [m["loss"] for m in read_metrics(tmp_path / "ref")]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MB tmpfs (one checkpoint of the FAST model is about 0.5 MB... 1.5 MB)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_leaves_the_last_checkpoint_usable(tiny_disk):
    out = tiny_disk / "run"
    sets = ["train.checkpoint_every=1", "train.steps=20"]
    proc = seqshard(out, sets=sets)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = errors(proc)
    assert "no room for checkpoint" in line or "disk filled" in line, line
    assert "Traceback" not in proc.stderr
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".partial")]
    done = sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert done and done[-1] < 20
    # the user frees space (all but the newest checkpoint); with keep_checkpoints the run finishes
    import shutil

    for step in done[:-1]:
        shutil.rmtree(out / "checkpoints" / f"step_{step}")
    proc = seqshard(out, "--resume", sets=[*sets, "train.keep_checkpoints=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 21))
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_20"]


def _peak_per_rank(rank, world_size, out):
    from seqshard.train import trainer

    trainer.peak_memory_mb = lambda device: 900.0 if rank == 1 else 100.0
    history = trainer.train(__import__("tests.helpers.training", fromlist=["small_spec"]).small_spec(
        out, world_size, ["train.steps=2"]))
    return [(m["peak_mem_mb"], m["peak_mem_rank"]) for m in history]


def test_peak_memory_is_the_max_over_ranks(tmp_path):
    for per_rank in run_ranks(2, _peak_per_rank, str(tmp_path / "run"), timeout=240):
        assert per_rank == [(900.0, 1), (900.0, 1)]


def test_metrics_lines_of_replayed_steps_are_kept(tmp_path):
    out = tmp_path / "run"
    assert seqshard(out, sets=["train.steps=3"]).returncode == 0  # checkpoints at 2 and 3
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_3")
    assert seqshard(out, "--resume", sets=["train.steps=3"]).returncode == 0
    replaced = [json.loads(x) for x in (out / "metrics.replaced.jsonl").read_text().splitlines()]
    assert [m["step"] for m in replaced] == [3]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
