"""Chaos: faults injected into real 2-rank torchrun jobs, then ``--resume``; nothing may be lost.

Every trial launches ``torchrun --nproc-per-node 2 -m seqshard train examples/tiny.yaml`` (a
small model, a checkpoint every step) and injects one fault:

- ``kill_rank``: SIGKILL one worker at a random moment (often inside a save);
- ``kill_in_save``: a worker dies hard after writing its shards, before the commit
  (``SEQSHARD_TEST_CRASH_DURING_SAVE``);
- ``kill_agent``: SIGKILL the torchrun agent only: its workers must die within seconds;
- ``kill_all``: SIGKILL the agent and both workers at once;
- ``sigterm``: SIGTERM to the agent (what SLURM / Kubernetes send): the workers checkpoint the
  step they are in and exit 75; 0 steps may be lost;
- ``sigstop``: SIGSTOP one worker: the job must end within the collective timeout + a few
  seconds, its error naming the stopped rank;
- ``two_writers``: a second job on the same folder while the first runs: refused in one line;
- ``disk_full``: the run folder on a small tmpfs (skipped where a tmpfs cannot be mounted): the
  job fails in one line and the last complete checkpoint resumes.

After each fault the job is resumed (``--resume``, more space for ``disk_full``) and its whole
loss trajectory must equal the uninterrupted run's (1e-6 relative; it is bit-identical in
practice). The table: fault, tries, survived, steps lost (steps trained before the fault and
not in a checkpoint), seconds from fault to the job's exit.

    python bench/chaos.py                 # all faults, 3 tries of the random ones (~6 min, 2 cores)
    python bench/chaos.py --tries 1 --faults sigterm,sigstop
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
TIMEOUT_S = 8  # train.collective_timeout_s of the sigstop trial
SETS = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
        "data.max_seq_len=128", "data.tokens_per_step=512", f"train.steps={STEPS}", "train.warmup_steps=2",
        "train.checkpoint_every=1", "train.log_every=1", "train.lr=3e-3"]
FAULTS = ("kill_rank", "kill_in_save", "kill_agent", "kill_all", "sigterm", "sigstop", "two_writers", "disk_full")


def command(out: Path, *extra, sets=()) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "seqshard", "train", str(ROOT / "examples" / "tiny.yaml"), *extra]
    for s in [*SETS, f"train.output_dir={out}", *sets]:
        cmd += ["--set", s]
    return cmd


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start(out: Path, *extra, sets=(), env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen(command(out, *extra, sets=sets), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def wait_steps(proc, out: Path, n: int, limit=240.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if steps_logged(out) >= n:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def workers(proc) -> list[psutil.Process]:
    try:
        return sorted(psutil.Process(proc.pid).children(), key=lambda p: p.pid)
    except psutil.NoSuchProcess:
        return []


def finish(proc, limit=240.0):
    """(exit code, stderr, seconds) once the job ended (killed after ``limit``)."""
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    return proc.returncode, err, time.monotonic() - t0


def losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    return [json.loads(x)["loss"] for x in lines if x.strip()]


def committed(out: Path) -> int:
    root = out / "checkpoints"
    steps = [int(p.name[5:]) for p in root.glob("step_*") if (p / "COMPLETE").is_file()] if root.is_dir() else []
    return max(steps, default=0)


def resume_and_compare(out: Path, reference: list[float], sets=()) -> tuple[bool, str]:
    code, err, _ = finish(start(out, "--resume", sets=sets))
    got = losses(out)
    same = len(got) == len(reference) and all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(got, reference))
    return code == 0 and same, "" if code == 0 and same else f"resume exit {code}: {err.strip()[-300:]}"


def trial(fault: str, work: Path, reference: list[float], rng: random.Random) -> dict:
    out = work / f"{fault}_{rng.randrange(10**6)}"
    row = {"fault": fault, "survived": False, "steps_lost": None, "exit_s": None, "note": ""}
    if fault == "disk_full":
        return _disk_full(out, reference, row)
    env = {"SEQSHARD_TEST_CRASH_DURING_SAVE": str(rng.randrange(2, STEPS))} if fault == "kill_in_save" else None
    sets = [f"train.collective_timeout_s={TIMEOUT_S}"] if fault == "sigstop" else []
    sets += ["train.steps=100000"] if fault == "two_writers" else []  # still running when the second starts
    proc = start(out, sets=sets, env=env)
    if not wait_steps(proc, out, rng.randrange(1, STEPS - 2)):
        code, err, _ = finish(proc)
        if fault != "kill_in_save":
            row["note"] = f"job ended before the fault: exit {code} {err.strip()[-300:]}"
            return row
    time.sleep(rng.uniform(0, 0.3))
    ranks = workers(proc)
    t0 = time.monotonic()
    trained = steps_logged(out)
    if fault == "kill_rank" and ranks:
        rng.choice(ranks).kill()
    elif fault == "kill_agent":
        os.kill(proc.pid, signal.SIGKILL)
        gone = psutil.wait_procs(ranks, timeout=30)[0]
        row["note"] = f"{len(gone)}/{len(ranks)} workers gone {time.monotonic() - t0:.1f} s after the agent"
        if len(gone) < len(ranks):
            for p in ranks:
                p.kill()
    elif fault == "kill_all":
        os.killpg(proc.pid, signal.SIGKILL)
    elif fault == "sigterm":
        proc.send_signal(signal.SIGTERM)
    elif fault == "sigstop" and ranks:
        victim = rng.randrange(len(ranks))  # torchrun starts local rank 0 first: pid order is rank order
        ranks[victim].send_signal(signal.SIGSTOP)
    elif fault == "two_writers":
        code2, err2, _ = finish(start(out, sets=sets))
        line = [x for x in err2.splitlines() if x.startswith("seqshard:")]
        row["note"] = f"second job: exit {code2}, {line[0][:120] if line else err2.strip()[-200:]}"
        proc.send_signal(signal.SIGTERM)  # then the first job is preempted, cleanly
        code, err, _ = finish(proc)
        row["survived"] = bool(line) and "in use by another job" in line[0] and "preempted by SIGTERM" in err
        row["steps_lost"] = max(0, steps_logged(out) - committed(out))
        return row
    code, err, _ = finish(proc)
    row["exit_s"] = round(time.monotonic() - t0, 1)
    trained = max(trained, steps_logged(out))
    row["steps_lost"] = max(0, trained - committed(out))
    if fault == "sigterm":
        ok = code != 0 and "preempted by SIGTERM" in err and row["steps_lost"] == 0  # torchrun exits 1
        row["note"] = f"exit {code}; " + next((x[:100] for x in err.splitlines() if "preempted" in x), "no line")
        if not ok:
            return row
    if fault == "sigstop":
        for p in ranks:
            p.kill() if p.is_running() else None
        named = f"stalled: rank {victim}" in err
        row["note"] = f"exit {code} after {row['exit_s']} s (timeout {TIMEOUT_S} s), stopped rank {victim} named: {named}"
        if not named:
            return row
    row["survived"], why = resume_and_compare(out, reference)
    row["note"] = "; ".join(x for x in (row["note"], why) if x)
    return row


def _disk_full(out: Path, reference: list[float], row: dict) -> dict:
    mount = Path(tempfile.mkdtemp(prefix="seqshard-disk-"))
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        row["note"] = f"skipped: cannot mount a tmpfs ({made.stderr.decode().strip()[:80] or 'not root'})"
        row["survived"] = None
        return row
    try:
        run = mount / "run"
        t0 = time.monotonic()
        code, err, _ = finish(start(run))
        row["exit_s"] = round(time.monotonic() - t0, 1)
        lines = [x for x in err.splitlines() if x.startswith("seqshard: error")]
        partial = list((run / "checkpoints").glob(".partial*")) if (run / "checkpoints").is_dir() else []
        row["steps_lost"] = max(0, steps_logged(run) - committed(run))
        row["note"] = f"exit {code}: {lines[0][:140] if lines else err.strip()[-200:]}"
        if code == 0 or len(lines) != 1 or partial or not committed(run):
            return row
        shutil.copytree(run, out)  # "more disk": the same folder on a large file system
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(mount, ignore_errors=True)
    row["survived"], why = resume_and_compare(out, reference)
    row["note"] += f"; {why}" if why else ""
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tries", type=int, default=3, help="tries of each randomized fault (default 3)")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="seqshard-chaos-"))
    try:
        code, err, _ = finish(start(work / "reference", sets=["train.checkpoint_every=0"]))
        assert code == 0, err[-2000:]
        reference = losses(work / "reference")
        rows = []
        for fault in args.faults.split(","):
            tries = args.tries if fault in ("kill_rank", "kill_in_save", "kill_all", "sigterm") else 1
            for _ in range(tries):
                rows.append(trial(fault, work, reference, rng))
                r = rows[-1]
                print(f"{fault:13s} survived={r['survived']} lost={r['steps_lost']} exit_s={r['exit_s']} {r['note']}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = {}
    for r in rows:
        t = table.setdefault(r["fault"], {"tried": 0, "survived": 0, "skipped": 0, "steps_lost": [], "exit_s": []})
        t["tried"] += 1
        t["survived"] += r["survived"] is True
        t["skipped"] += r["survived"] is None
        t["steps_lost"] += [r["steps_lost"]] if r["steps_lost"] is not None else []
        t["exit_s"] += [r["exit_s"]] if r["exit_s"] is not None else []
    print(f"\n{'fault':13s} {'tried':>5s} {'survived':>8s} {'steps lost':>10s} {'exit s (max)':>12s}")
    for fault, t in table.items():
        print(f"{fault:13s} {t['tried']:5d} {t['survived']:8d} {max(t['steps_lost'], default=0):10d} "
              f"{max(t['exit_s'], default=0):12.1f}" + ("  (skipped)" if t["skipped"] else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "steps": STEPS,
                                          "timeout_s": TIMEOUT_S, "rows": rows, "table": table}, indent=1) + "\n")
    print(f"wrote {args.out}")
    failed = sum(t["tried"] - t["survived"] - t["skipped"] for t in table.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
