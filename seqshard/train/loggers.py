"""Metric sinks beside ``metrics.jsonl``: TensorBoard and Weights & Biases, rank 0 only.

``train.loggers`` names them; ``jsonl`` (``metrics.jsonl``, the public contract) is always
written. W&B runs offline unless ``WANDB_API_KEY`` is set (or ``WANDB_MODE`` says otherwise):
nothing here needs the network. Both record the run config (the resolved spec, the launch
command, the engine) once at start.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .logs import MetricsWriter


def launch_command() -> str:
    """The command line this process was started with (``python -m seqshard train ...``)."""
    return shlex.join([sys.executable, *sys.argv]) if sys.argv and sys.argv[0] else sys.executable


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalars(metrics: dict) -> dict:
    """The numbers of a step's metrics; a map of numbers (``loss_by_source``, ``tokens_by_source``)
    gives one scalar per entry, ``key/name`` (a source without a value that step gives none)."""
    out = {}
    for k, v in metrics.items():
        if _number(v) and k != "step":
            out[k] = float(v)
        elif isinstance(v, dict):
            out.update({f"{k}/{name}": float(x) for name, x in v.items() if _number(x)})
    return out


class TensorBoardSink:
    def __init__(self, output_dir, config: dict, resume_after: int):
        from torch.utils.tensorboard import SummaryWriter

        import yaml

        # purge_step drops events past the checkpoint, so a resumed run has one trajectory
        self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                    purge_step=resume_after + 1 if resume_after else None)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)

    def write(self, metrics: dict):
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, metrics["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbSink:
    def __init__(self, output_dir, name: str, config: dict):
        import wandb

        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "seqshard"), name=name,
                              dir=str(output_dir), config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def write(self, metrics: dict):
        self.run.log(_scalars(metrics), step=metrics["step"])

    def close(self):
        self.run.finish()


class RunLoggers:
    """``metrics.jsonl`` plus the spec's extra sinks; every method is a no-op off rank 0."""

    def __init__(self, spec, rank: int, config: dict, keep_through: int = 0):
        out = spec.train.output_dir
        self.sinks = [MetricsWriter(out, rank, keep_through=keep_through)]
        if rank != 0:
            return
        if "tensorboard" in spec.train.loggers:
            self.sinks.append(TensorBoardSink(out, config, keep_through))
        if "wandb" in spec.train.loggers:
            self.sinks.append(WandbSink(out, spec.name, config))

    def write(self, metrics: dict):
        for sink in self.sinks:
            sink.write(metrics)

    def close(self):
        for sink in self.sinks:
            sink.close()
