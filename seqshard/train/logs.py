"""Human logs on rank 0 only; numbers as data in ``metrics.jsonl`` (STYLE rule 11)."""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm


def get_logger(rank: int) -> logging.Logger:
    log = logging.getLogger("seqshard")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s seqshard %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return log


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def parse_metrics(path) -> tuple[list[dict], list[str]]:
    """The step records of a ``metrics.jsonl`` and a note for each line that is not one (a line
    torn by a crash mid-write, named by file and 1-based line): such lines are skipped."""
    records, bad = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad.append(f"{path} line {number}: not a complete JSON step record (skipped)")
    return records, bad


def read_metrics(output_dir) -> list[dict]:
    """The step records of ``<output_dir>/metrics.jsonl`` (torn lines skipped with a warning)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records, bad = parse_metrics(path)
    for note in bad:
        logging.getLogger("seqshard").warning(note)
    return records


class MetricsWriter:
    """One JSON object per optimizer step in ``<output_dir>/metrics.jsonl`` (rank 0 writes).

    On resume the lines of steps after the checkpoint (they are trained again) move to
    ``metrics.replaced.jsonl`` and the file is rewritten atomically: nothing is lost, and a line
    torn by a crash is dropped with a warning naming it."""

    def __init__(self, output_dir, rank: int, keep_through: int = 0):
        """``keep_through``: on resume, keep the lines of steps <= the checkpoint's step."""
        self.file = None
        if rank != 0:
            return
        path = Path(output_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_through and path.exists():
            records, bad = parse_metrics(path)
            for note in bad:
                logging.getLogger("seqshard").warning(note)
            replaced = [r for r in records if r["step"] > keep_through]
            if replaced:
                with (path.parent / "metrics.replaced.jsonl").open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in replaced)
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= keep_through))
            os.replace(tmp, path)
        elif path.exists() and path.stat().st_size:  # claim_output_dir allowed it: --resume found no checkpoint
            with (path.parent / "metrics.replaced.jsonl").open("a") as f:
                f.write(path.read_text())
        self.file = path.open("a" if keep_through else "w")

    def write(self, metrics: dict):
        if self.file:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise (SLURM output files, pipes) one
    log line every ``train.log_every`` steps with step, loss, tokens/s and the ETA."""

    def __init__(self, done: int, total: int, rank: int):
        self.bar = None
        self.done, self.total, self.start = done, total, time.perf_counter()
        if rank == 0 and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.close()

    def update(self, m: dict, log):
        taken = m["step"] - self.done
        eta = (time.perf_counter() - self.start) / max(1, taken) * (self.total - m["step"])
        line = (f"step {m['step']}/{self.total} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                f"grad_norm {m['grad_norm']:.3f} {m['tokens_per_s']:.0f} tok/s {m['step_time_s']:.2f}s "
                f"eta {_duration(eta)}")
        if "eval_loss" in m:
            line += f" eval_loss {m['eval_loss']:.4f} eval_ppl {m['eval_ppl']:.2f}"
        if self.bar:
            self.bar.set_postfix_str(f"loss {m['loss']:.4f} {m['tokens_per_s']:.0f} tok/s")
            self.bar.update(1)
        elif log is not None:
            log.info(line)
