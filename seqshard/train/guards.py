"""What ends a run early without losing it: a preemption signal, a non-finite step.

**Preemption.** SIGTERM and SIGINT (what SLURM, Kubernetes and Ctrl-C send before a kill) and
SIGUSR1 (SLURM's ``--signal=USR1@T`` warning) only set a flag. The ranks agree on it at the end
of every step inside the all-gather the step already makes, so every rank checkpoints that same
step and leaves with :data:`PREEMPTED_EXIT_CODE`; ``--resume`` then continues with no step lost.
A second SIGINT interrupts at once (KeyboardInterrupt), as a user pressing Ctrl-C twice expects.

**Non-finite steps.** The engines never apply a non-finite gradient (the optimizer step is
skipped when the global gradient norm is not finite). ``train.on_nonfinite: stop`` (default)
then ends the run with :data:`NONFINITE_EXIT_CODE` naming the step; ``skip`` counts the step and
goes on, until ``train.max_nonfinite_in_row`` such steps come in a row. A run never exits 0
after training on a non-finite value (DESIGN.md invariant 11).
"""
from __future__ import annotations

import math
import signal
import threading
import time

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later (requeue, then --resume)
NONFINITE_EXIT_CODE = 4
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class Preempted(Exception):
    """Every rank checkpointed after a preemption signal; the CLI prints one line and exits 75."""

    exit_code = PREEMPTED_EXIT_CODE


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm under the run's policy; the CLI exits 4."""

    exit_code = NONFINITE_EXIT_CODE


class Preemption:
    """Signal handlers that record the first preemption signal (main thread only; a no-op
    elsewhere, e.g. when a library user calls ``train`` from a worker thread)."""

    def __init__(self):
        self.signal_name, self.received_at, self.previous = None, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                num = getattr(signal, name)
                self.previous[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc):
        for num, handler in self.previous.items():
            signal.signal(num, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signal_name is None:
            self.signal_name, self.received_at = signal.Signals(signum).name, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def seconds_since(self) -> float:
        return time.monotonic() - self.received_at if self.received_at else 0.0


class NonFiniteGuard:
    """Applies ``train.on_nonfinite`` to each step's (global) loss and gradient norm."""

    def __init__(self, policy: str, max_in_row: int, engine_skips: bool = True):
        """``engine_skips``: the engine drops a non-finite update (torch, fsdp2); DeepSpeed's
        applies it before the norm is known, so only ``stop`` is allowed there (the spec says so)."""
        self.policy, self.max_in_row, self.engine_skips = policy, max_in_row, engine_skips
        self.in_row, self.skipped = 0, 0

    def check(self, metrics: dict, norm_known: bool = True) -> None:
        """Mark the step's metrics; raise NonFiniteError when the run must stop. ``norm_known``
        False: the engine reported no gradient norm (NaN stands for "none"), only the loss counts."""
        loss, norm = metrics["loss"], metrics["grad_norm"]
        if math.isfinite(loss) and (math.isfinite(norm) or not norm_known):
            self.in_row = 0
            if self.skipped:
                metrics["skipped_steps"] = self.skipped
            return
        self.in_row += 1
        self.skipped += 1
        metrics.update(nonfinite=True, skipped_steps=self.skipped)
        applied = "the update was not applied" if self.engine_skips else "nothing was saved after it"
        what = f"step {metrics['step']}: loss {loss}, grad_norm {norm} (not finite); {applied}"
        if self.policy == "stop":
            raise NonFiniteError(f"{what}; the last checkpoint is the newest good state: lower train.lr, "
                                 "check the data, or set train.on_nonfinite: skip")
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(f"{what}; {self.in_row} non-finite steps in a row "
                                 f"(train.max_nonfinite_in_row {self.max_in_row}): the run diverged")
