"""Measured vs predicted step time on 2 gloo ranks: adaptive scattering and the fixed sp=2 run,
over a sweep of length mixes, with the cost model fitted on this machine.

1. Calibrates (``seqshard.report.calibrate.calibrate_model``, what ``seqshard calibrate --spec``
   runs): compute and per-micro-batch cost from forward + backward of the bench's model on one
   process, all-to-all latency and bandwidth for group size 2, the per-step optimizer + gradient
   all-reduce cost. Saved to bench/results/calibration_cpu.json (``--calibration FILE`` reuses one).
2. For every mix (max document length / memory tokens per rank), trains the same spec (a small
   Llama on packed stdlib documents) through ``seqshard launch`` (torchrun, 2 ranks, one per
   core) two ways: ``adaptive`` (max_sp 2, planner profile = the calibration file) and static
   Ulysses ``sp: 2``, for ``--steps`` steps. Measured: mean step time (first step left out).
3. Predicted, for the same step batches (rebuilt from the seed): the plan rank 0 makes with the
   fitted cost model; each group's documents packed as the runtime packs them, every micro-batch
   priced by ``CostModel.microbatch_time``, the slowest group plus the per-step cost. The static
   run likewise (its micro-batches are the packed rows, Ulysses over 2).
Writes bench/results/planner_measured.json; prints the table and the load average.

    python bench/planner_measured.py [--steps 8] [--calibration bench/results/calibration_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqshard.launch.spec import load_spec  # noqa: E402
from seqshard.parallel.adaptive import pack_in_order  # noqa: E402
from seqshard.parallel.cost_model import CostModel  # noqa: E402
from seqshard.parallel.hardware import get_profile  # noqa: E402
from seqshard.parallel.planner import plan_step  # noqa: E402
from seqshard.train.trainer import build_batch_builder, micro_batches  # noqa: E402

MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=192"]
# (name, max document length, memory tokens per rank): the longest documents need sp=2 by memory
MIXES = [("long_tail_1k", 1024, 512), ("long_tail_2k", 2048, 1024), ("short_512", 512, 256)]


def base(steps, max_len):
    return MODEL + ["data.batching=pack", f"data.max_seq_len={max_len}", "data.tokens_per_step=4096",
                    f"train.steps={steps}", "train.checkpoint_every=0", "launch.nproc_per_node=2", "train.log_every=100"]


def runs(memory, calibration):
    return {"adaptive": ["parallel.sp_method=adaptive", "parallel.max_sp=2", f"parallel.planner.memory_tokens={memory}",
                         f"parallel.planner.profile={calibration}"],
            "static_sp2": ["parallel.sp=2", "parallel.sp_method=ulysses"]}


def predictions(spec, cm, memory, steps):
    """Predicted seconds per step (the first left out, as measured) for both runs."""
    from seqshard.data.corpus import load_corpus

    builder = build_batch_builder(spec, load_corpus("stdlib"))
    overhead = cm.profile.step_overhead_s
    pred = {"adaptive": [], "static_sp2": []}
    for _ in range(steps):
        batch = builder.next_batch()
        lengths = [n for row in batch.rows for n in row.doc_lens]
        plan = plan_step(lengths, 2, max_sp=2, memory_tokens=memory, cost_model=cm)
        groups = []
        for g, (_, size) in enumerate(plan.groups):
            ids = [i for i, a in enumerate(plan.assignment) if a == g]
            groups.append(sum(cm.microbatch_time([lengths[i] for i in mb], size, plan.methods[g])
                              for mb in pack_in_order(ids, lengths, size * memory)))
        pred["adaptive"].append(max(groups) + overhead)
        budget = spec.data.micro_batch_tokens or spec.data.max_seq_len
        pred["static_sp2"].append(sum(cm.microbatch_time([n for r in mb for n in r.doc_lens], 2, "ulysses")
                                      for mb in micro_batches(batch.rows, budget)) + overhead)
    return {k: float(np.mean(v[1:])) for k, v in pred.items()}


def calibrate(path):
    from seqshard.report.calibrate import calibrate_model, save_profile

    spec = load_spec(ROOT / "examples/tiny.yaml", MODEL)
    profile = calibrate_model(spec.model)
    save_profile(profile, path, spec.model)
    return profile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--calibration", help="a calibration file to reuse (default: calibrate now)")
    args = ap.parse_args()
    start = time.perf_counter()
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    calibration = Path(args.calibration or ROOT / "bench/results/calibration_cpu.json").resolve()
    if not args.calibration:
        calibrate(calibration)
    record = json.loads(calibration.read_text())
    print(f"calibration {calibration.name}: {json.dumps(record['profile'], default=str)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = []
    for mix, max_len, memory in MIXES:
        measured = {}
        for name, extra in runs(memory, calibration).items():
            out = ROOT / "runs" / "bench-planner" / mix / name
            sets = [f"--set={s}" for s in base(args.steps, max_len) + extra + [f"train.output_dir={out}"]]
            subprocess.run([sys.executable, "-m", "seqshard", "launch", str(ROOT / "examples/tiny.yaml"), *sets],
                           env=env, check=True, capture_output=True)
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            measured[name] = {"step_s": float(np.mean([r["step_time_s"] for r in metrics[1:]])),
                              "losses": [r["loss"] for r in metrics],
                              "peak_mem_mb": max(r.get("peak_mem_mb", 0) or 0 for r in metrics),
                              "group_sizes": [r.get("plan_group_sizes") for r in metrics]}
        spec = load_spec(ROOT / "examples/tiny.yaml", base(args.steps, max_len) + runs(memory, calibration)["adaptive"])
        cm = CostModel.from_model_config(spec.model, get_profile(str(calibration)), bytes_per_element=4)
        pred = predictions(spec, cm, memory, args.steps)
        a, b = np.array(measured["adaptive"]["losses"]), np.array(measured["static_sp2"]["losses"])
        for name in measured:
            m, p = measured[name]["step_s"], pred[name]
            rows.append({"mix": mix, "max_len": max_len, "memory_tokens": memory, "run": name, "measured_s": m,
                         "predicted_s": p, "error": p / m - 1, "peak_mem_mb": measured[name]["peak_mem_mb"],
                         "group_sizes": measured[name]["group_sizes"], "losses": measured[name]["losses"]})
            print(f"{mix:<14}{name:<12} measured {m:7.3f} s  predicted {p:7.3f} s  error {100 * (p / m - 1):+6.1f}%  "
                  f"peak {measured[name]['peak_mem_mb']:.0f} MB", flush=True)
        print(f"{mix:<14}adaptive / static sp=2: {measured['adaptive']['step_s'] / measured['static_sp2']['step_s']:.3f}"
              f"  largest loss rel. difference {float(np.max(np.abs(a - b) / np.abs(b))):.2e}", flush=True)
    load = os.getloadavg()
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest |predicted/measured - 1|: {100 * worst:.1f}% (goal 20%); {time.perf_counter() - start:.0f} s; "
          f"load average (1/5/15 min) {load}")
    result = {"machine": "2 CPU cores, 2 gloo ranks", "calibration": record, "steps": args.steps, "rows": rows,
              "largest_abs_error": worst, "load_average_after": load}
    (ROOT / "bench/results/planner_measured.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
