"""Measured adaptive scattering on 4 gloo ranks vs static SP, same batches, with predictions.

Trains the same spec (a small Llama on packed stdlib documents, long-tailed) three ways through
``seqshard launch`` (torchrun, 4 ranks): ``adaptive`` (max_sp 4), static Ulysses ``sp: 4``, and
``sp: 1`` (pure data parallel). Reports the mean measured step time (first step left out) and the
cost model's prediction (``cpu_gloo`` profile) for the same step batches, rebuilt here from the
seed. Writes bench/results/planner_measured.json.

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

STEPS, MEMORY = 6, 512
BASE = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=192",
        "data.batching=pack", "data.max_seq_len=1024", "data.tokens_per_step=4096", f"train.steps={STEPS}",
        "train.checkpoint_every=0", "launch.nproc_per_node=4", "train.log_every=100"]
RUNS = {"adaptive": ["parallel.sp_method=adaptive", "parallel.max_sp=4", f"parallel.planner.memory_tokens={MEMORY}"],
        "static_sp4": ["parallel.sp=4", "parallel.sp_method=ulysses"],
        "static_sp1": ["parallel.sp=1", "parallel.sp_method=none"]}


def predictions(spec):
    from seqshard.data.corpus import load_corpus

    cm = CostModel.from_model_config(spec.model, get_profile("cpu_gloo"), bytes_per_element=4)
    builder = build_batch_builder(spec, load_corpus("stdlib"))
    pred = {"adaptive": [], "static_sp4": [], "static_sp1": []}
    for _ in range(STEPS):
        lengths = [n for row in builder.next_batch().rows for n in row.doc_lens]
        pred["adaptive"].append(plan_step(lengths, 4, max_sp=4, memory_tokens=MEMORY, cost_model=cm).predicted_time_s)
        pred["static_sp4"].append(static_plan(lengths, 4, 4, memory_tokens=MEMORY, cost_model=cm).predicted_time_s)
        pred["static_sp1"].append(static_plan(lengths, 4, 1, memory_tokens=10**9, cost_model=cm).predicted_time_s)
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
    spec = load_spec(ROOT / "examples/tiny.yaml", BASE + RUNS["static_sp1"])
    pred = predictions(spec)
    print(f"{'layout':<12}{'measured s':>12}{'predicted s':>13}")
    for name in RUNS:
        print(f"{name:<12}{measured[name]['step_s']:>12.3f}{pred[name]:>13.3f}")
    same = all(np.allclose(measured[n]["losses"], measured["static_sp1"]["losses"], rtol=1e-4) for n in RUNS)
    print(f"same losses in every layout: {same}")
    result = {"machine": "2 CPU cores, 4 gloo ranks (oversubscribed)", "profile": "cpu_gloo",
              "memory_tokens": MEMORY, "measured": measured, "predicted": pred, "same_losses": bool(same)}
    (ROOT / "bench/results/planner_measured.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
