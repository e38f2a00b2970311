"""Learning-rate schedules: linear warmup to ``train.lr``, then ``train.lr_schedule``.

- ``cosine``: cosine decay to ``lr * min_lr_ratio`` over the steps after warmup (the default,
  bit-identical to the trainer's original ``lr_at``);
- ``linear``: straight line down to ``lr * min_lr_ratio``;
- ``constant``: ``lr`` after warmup;
- ``wsd`` (warmup-stable-decay, MiniCPM, arXiv:2404.06395): ``lr`` until the last
  ``train.decay_fraction`` of the steps, then linear decay to ``lr * min_lr_ratio``; what
  long-context continued pre-training uses, since a run can branch off the stable phase.

The learning rate is a pure function of the 1-based step and the spec, so resuming from a
checkpoint can never drift: :class:`Schedule` state (name, step, last lr) goes into the
checkpoint's ``trainer.json`` and is checked against the spec on resume. torch's
``LambdaLR`` computes ``base_lr * factor``, which rounds differently from the original
``lr * step / warmup`` and cannot drive DeepSpeed's ZeRO optimizer wrappers (not
``torch.optim.Optimizer``s), so the engines take the value through ``set_lr`` instead.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def decay_start(t) -> int:
    """wsd: the last step of the stable phase (decay runs over steps decay_start+1 .. steps)."""
    return t.steps - round(t.decay_fraction * t.steps)


def lr_at(step: int, t) -> float:
    """The learning rate of 1-based ``step`` under train spec ``t``."""
    if step <= t.warmup_steps:
        return t.lr * step / max(1, t.warmup_steps)
    if t.lr_schedule == "constant":
        return t.lr
    if t.lr_schedule == "wsd":
        start = max(decay_start(t), t.warmup_steps)
        if step <= start:
            return t.lr
        progress = (step - start) / max(1, t.steps - start)
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * (1 - min(1.0, progress)))
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    if t.lr_schedule == "linear":
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * (1 - min(1.0, progress)))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


class Schedule:
    """The spec's schedule with a checkpointable state (the last step taken and its lr)."""

    def __init__(self, t):
        self.t, self.last_step, self.last_lr = t, 0, 0.0

    def lr(self, step: int) -> float:
        self.last_step, self.last_lr = step, lr_at(step, self.t)
        return self.last_lr

    def _key(self) -> dict:
        t = self.t
        return {"name": t.lr_schedule, "lr": t.lr, "warmup_steps": t.warmup_steps, "steps": t.steps,
                "min_lr_ratio": t.min_lr_ratio, "decay_fraction": t.decay_fraction}

    def state_dict(self) -> dict:
        return {**self._key(), "last_step": self.last_step, "last_lr": self.last_lr}

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore; return the settings that differ from the checkpoint's (for a warning)."""
        self.last_step, self.last_lr = state.get("last_step", 0), state.get("last_lr", 0.0)
        return [f"{k} {state[k]} -> {v}" for k, v in self._key().items() if k in state and state[k] != v]
