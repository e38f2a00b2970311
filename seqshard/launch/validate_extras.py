"""Checks of the trainer's schedule, evaluation, logger and SLURM keys (one SpecError line each)."""
from __future__ import annotations

import importlib.util

from .spec import SpecError

LR_SCHEDULES = ("cosine", "linear", "constant", "wsd")
LOGGERS = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # name -> module it needs


def _check_schedule(t):
    if t.lr_schedule not in LR_SCHEDULES:
        raise SpecError("train.lr_schedule", f"{t.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if not 0 < t.decay_fraction <= 1:
        raise SpecError("train.decay_fraction", f"must be in (0, 1], got {t.decay_fraction}")
    if t.lr_schedule == "wsd" and t.warmup_steps > t.steps - round(t.decay_fraction * t.steps):
        raise SpecError("train.decay_fraction", f"wsd: warmup {t.warmup_steps} steps overlaps the decay "
                        f"(the last {round(t.decay_fraction * t.steps)} of {t.steps} steps); lower one of them")


def _check_eval(d, t):
    e = d.eval
    if e.fraction and (e.source or e.sources):
        raise SpecError("data.eval", "set either fraction (a held-out split of data.source) or source / sources, "
                        "not both")
    if not 0 <= e.fraction < 1:
        raise SpecError("data.eval.fraction", f"{e.fraction} must be in [0, 1): a fraction >= 1 leaves no "
                        "training documents")
    if e.fraction and d.max_documents and max(1, round(e.fraction * d.max_documents)) >= d.max_documents:
        raise SpecError("data.eval.fraction", f"{e.fraction} of data.max_documents {d.max_documents} leaves no "
                        "training documents; lower the fraction or raise max_documents")
    if t.eval_every < 0 or t.eval_tokens < 0:
        key = "train.eval_every" if t.eval_every < 0 else "train.eval_tokens"
        raise SpecError(key, "must be >= 0")
    if (t.eval_every or t.eval_tokens) and not (e.fraction or e.source or e.sources):
        raise SpecError("train.eval_every" if t.eval_every else "train.eval_tokens",
                        "needs held-out data: set data.eval.fraction (e.g. 0.05), data.eval.source or "
                        "data.eval.sources")
    if t.eval_tokens % d.tokens_per_step:
        raise SpecError("train.eval_tokens", f"{t.eval_tokens} is not a multiple of data.tokens_per_step "
                        f"{d.tokens_per_step} (evaluation runs whole steps' batches)")


def _check_loggers(t):
    if not isinstance(t.loggers, list) or not all(isinstance(x, str) for x in t.loggers):
        raise SpecError("train.loggers", f"expected a list such as [jsonl, tensorboard], got {t.loggers!r}")
    for name in t.loggers:
        if name not in LOGGERS:
            raise SpecError("train.loggers", f"{name!r} is not one of {', '.join(LOGGERS)}")
        module = LOGGERS[name]
        if module and importlib.util.find_spec(module) is None:
            raise SpecError("train.loggers", f"{name} is not installed: pip install 'seqshard[loggers]' "
                            f"(or pip install {module}), or remove {name} from train.loggers")


def _check_slurm(launch):
    if launch.slurm.signal_s < 0:
        raise SpecError("launch.slurm.signal_s", f"must be >= 0 (0: no warning signal), got {launch.slurm.signal_s}")
    g = launch.slurm.gpus_per_node
    if g and g != launch.nproc_per_node:
        raise SpecError("launch.slurm.gpus_per_node", f"{g} differs from launch.nproc_per_node "
                        f"{launch.nproc_per_node}; set only launch.nproc_per_node (one rank per GPU)")


def check_extras(spec):
    _check_schedule(spec.train)
    _check_eval(spec.data, spec.train)
    _check_loggers(spec.train)
    _check_slurm(spec.launch)
