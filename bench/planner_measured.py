"""Measured adaptive scattering on 2 gloo ranks vs the fixed sp=2 run, same batches, with predictions.

Trains the same spec (a small Llama on packed stdlib documents, long-tailed: documents up to 1024
tokens with 512 tokens of memory per rank, so the longest need sp=2) two ways through
``seqshard launch`` (torchrun, 2 ranks, one per core): ``adaptive`` (max_sp 2) and static Ulysses
``sp: 2``, for 20 steps. Reports the mean measured step time (first step left out), the loss
trajectories' largest relative difference, and the cost model's prediction (``cpu_gloo``
profile) for the same step batches, rebuilt here from the seed.
Writes bench/results/planner_measured.json.

    python bench/planner_measured.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqshard.launch.spec import load_spec  # noqa: E402
from seqshard.train.trainer import build_batch_builder  # noqa: E402
from seqshard.parallel.cost_model import CostModel  # noqa: E402
from seqshard.parallel.hardware import get_profile  # noqa: E402
from seqshard.parallel.planner import plan_step, static_plan  # noqa: E402

STEPS, MEMORY = 20, 512
BASE = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=192",
        "data.batching=pack", "data.max_seq_len=1024", "data.tokens_per_step=4096", f"train.steps={STEPS}",
        "train.checkpoint_every=0", "launch.nproc_per_node=2", "train.log_every=100"]
RUNS = {"adaptive": ["parallel.sp_method=adaptive", "parallel.max_sp=2", f"parallel.planner.memory_tokens={MEMORY}"],
        "static_sp2": ["parallel.sp=2", "parallel.sp_method=ulysses"]}


def predictions(spec):
    from seqshard.data.corpus import load_corpus

    cm = CostModel.from_model_config(spec.model, get_profile("cpu_gloo"), bytes_per_element=4)
    builder = build_batch_builder(spec, load_corpus("stdlib"))
    pred = {"adaptive": [], "static_sp2": []}
    for _ in range(STEPS):
        lengths = [n for row in builder.next_batch().rows for n in row.doc_lens]
        pred["adaptive"].append(plan_step(lengths, 2, max_sp=2, memory_tokens=MEMORY, cost_model=cm).predicted_time_s)
        pred["static_sp2"].append(static_plan(lengths, 2, 2, memory_tokens=MEMORY, cost_model=cm).predicted_time_s)
    return {k: float(np.mean(v[1:])) for k, v in pred.items()}


def main():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    measured = {}
    for name, extra in RUNS.items():
        out = ROOT / "runs" / "bench-planner" / name
        sets = [f"--set={s}" for s in BASE + extra + [f"train.output_dir={out}"]]
        subprocess.run([sys.executable, "-m", "seqshard", "launch", str(ROOT / "examples/tiny.yaml"), *sets],
                       env=env, check=True, capture_output=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        measured[name] = {"step_s": float(np.mean([r["step_time_s"] for r in rows[1:]])),
                          "losses": [r["loss"] for r in rows]}
        print(f"{name:<12} measured {measured[name]['step_s']:.3f} s/step", flush=True)
    spec = load_spec(ROOT / "examples/tiny.yaml", BASE + RUNS["static_sp2"])
    pred = predictions(spec)
    print(f"{'layout':<12}{'measured s':>12}{'predicted s':>13}")
    for name in RUNS:
        print(f"{name:<12}{measured[name]['step_s']:>12.3f}{pred[name]:>13.3f}")
    a, b = np.array(measured["adaptive"]["losses"]), np.array(measured["static_sp2"]["losses"])
    rel = float(np.max(np.abs(a - b) / np.abs(b)))
    ratio = measured["adaptive"]["step_s"] / measured["static_sp2"]["step_s"]
    print(f"adaptive / static sp=2 step time: {ratio:.3f}; largest loss rel. difference {rel:.2e}")
    load = os.getloadavg()
    print(f"load average during the run (1/5/15 min): {load}")
    result = {"machine": "2 CPU cores, 2 gloo ranks", "profile": "cpu_gloo", "memory_tokens": MEMORY,
              "steps": STEPS, "measured": measured, "predicted": pred, "step_time_ratio": ratio,
              "max_loss_rel_diff": rel, "load_average_after": load}
    (ROOT / "bench/results/planner_measured.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
