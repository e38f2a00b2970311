"""Small specs and rank functions shared by the end-to-end training tests."""
from __future__ import annotations

import json
from pathlib import Path

from seqshard.launch.spec import apply_overrides, from_dict, load_raw

ROOT = Path(__file__).resolve().parents[2]

SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
         "data.max_seq_len=256", "data.tokens_per_step=1024", "train.steps=5", "train.warmup_steps=2",
         "train.log_every=100", "train.checkpoint_every=0", "train.lr=3e-3"]


def small_spec(output_dir, world_size, overrides=(), base="tiny.yaml"):
    raw = apply_overrides(load_raw(ROOT / "examples" / base),
                          SMALL + [f"train.output_dir={output_dir}"] + list(overrides))
    return from_dict(raw, world_size)


def train_rank(rank, world_size, output_dir, overrides, kwargs=None):
    """Run ``seqshard.train.trainer.train`` on this rank; return the per-step losses."""
    from seqshard.train.trainer import train

    history = train(small_spec(output_dir, world_size, overrides), **(kwargs or {}))
    return [m["loss"] for m in history]


def read_metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_losses_close(a, b, rel=1e-4):
    assert len(a) == len(b), (a, b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rel * abs(y), f"step {i + 1}: {x} vs {y} (rel {abs(x - y) / abs(y):.2e} > {rel})"
