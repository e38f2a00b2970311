"""Measured vs predicted step time on 2 gloo ranks: adaptive scattering and the fixed sp=2 run,
over a sweep of length mixes, with the cost model calibrated on this machine.

1. Calibrates (``seqshard.report.calibrate.calibrate_model``, what ``seqshard calibrate --spec``
   runs): per group size and method (1: local, 2: Ulysses, 2: Ring), one micro-batch's seconds
   as a fixed cost plus each document's tokens x a per-token cost measured at its length, on
   forward + backward of the bench's model through the adaptive runtime's own attention path,
   both ranks running; scaled by 2-rank training runs of examples/tiny.yaml (3 per layout,
   medians). Saved to bench/results/calibration_cpu.json (``--calibration FILE`` reuses one).
2. For every mix, trains the same spec (a small Llama, packed documents) through
   ``seqshard launch`` (torchrun, 2 ranks, one per core) two ways: ``adaptive`` (max_sp 2,
   planner profile = the calibration file) and static Ulysses ``sp: 2``, for ``--steps`` steps.
   The mixes: two long-tailed ones (``tail_*``: short documents, and about 3% of documents longer
   than one rank's memory_tokens, so they need sp=2 by memory; written to a JSONL file from the
   stdlib's text) and the stdlib itself cut at max_seq_len (most steps hold a document that
   needs sp=2). Measured: mean step time (first step left out), losses, peak memory; each run
   ``--repeats`` times, interleaved, and the median run kept (identical runs differ by up to
   15% on this machine).
3. Predicted, for the same step batches (rebuilt from the seed): the plan rank 0 makes with the
   fitted cost model; each group's documents packed as the runtime packs them, every micro-batch
   priced by ``CostModel.microbatch_time``, the slowest group plus the per-step cost. The static
   run likewise (its micro-batches are the packed rows, Ulysses over 2).
Writes bench/results/planner_measured.json; prints the table and the load average.

    python bench/planner_measured.py [--steps 20] [--repeats 3] [--calibration bench/results/calibration_cpu.json]
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
from seqshard.parallel.cost_model import CostModel  # noqa: E402
from seqshard.parallel.hardware import get_profile  # noqa: E402

MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=192"]
# (name, data source, max document length, memory tokens per rank): the longest documents need sp=2
MIXES = [("tail_2k", "tail", 2048, 1024), ("tail_1k", "tail", 1024, 512), ("stdlib_2k", "stdlib", 2048, 1024)]
TAIL_FRACTION = 0.03  # of documents longer than memory_tokens


def tail_source(max_len, memory, n_docs=3000, seed=0):
    """A JSONL file of documents cut from the stdlib's text: lognormal lengths (median 200 bytes)
    below ``memory``, and a share TAIL_FRACTION uniform in (memory, max_len] (byte tokenizer: one
    token per byte, plus BOS/EOS)."""
    import sysconfig

    path = ROOT / "runs" / "bench-planner" / f"tail_{max_len}_{memory}.jsonl"
    if path.exists():
        return path
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(f.read_text(errors="replace") for f in sorted(root.glob("*.py"))[:200])
    rng = np.random.default_rng(seed)
    body = np.clip(rng.lognormal(np.log(200), 0.9, n_docs), 16, memory - 2)
    tail = rng.integers(memory + 1, max_len - 2, n_docs, endpoint=True)
    lengths = np.where(rng.random(n_docs) < TAIL_FRACTION, tail, body).astype(int)
    starts = rng.integers(0, len(text) - max_len, n_docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for a, n in zip(starts, lengths):
            f.write(json.dumps({"text": text[a:a + n]}) + "\n")
    return path


def base(steps, max_len, source="stdlib"):
    return MODEL + [f"data.source={source}", "data.batching=pack", f"data.max_seq_len={max_len}",
                    "data.tokens_per_step=4096", f"train.steps={steps}", "train.checkpoint_every=0",
                    "launch.nproc_per_node=2", "train.log_every=100"]


STATIC_SP2 = ["parallel.sp=2", "parallel.sp_method=ulysses"]


def runs(memory, calibration):
    return {"adaptive": ["parallel.sp_method=adaptive", "parallel.max_sp=2", f"parallel.planner.memory_tokens={memory}",
                         f"parallel.planner.profile={calibration}"],
            "static_sp2": STATIC_SP2}


def predictions(spec, cm, steps):
    """Predicted seconds per step (the first left out, as measured) for both runs."""
    from seqshard.report.step_model import predict_steps

    static = load_spec(ROOT / "examples/tiny.yaml", base(steps, spec.data.max_seq_len, spec.data.source)
                       + STATIC_SP2)
    return {"adaptive": float(np.mean(predict_steps(spec, cm, 2)[1:])),
            "static_sp2": float(np.mean(predict_steps(static, cm, 2)[1:]))}


def calibrate(path):
    from seqshard.report.calibrate import calibrate_model
    from seqshard.report.calibration_file import save_profile

    spec = load_spec(ROOT / "examples/tiny.yaml", MODEL)
    profile = calibrate_model(spec.model, spec_path=ROOT / "examples/tiny.yaml", overrides=MODEL)
    save_profile(profile, path, spec.model)
    return profile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each (mix, layout), interleaved; the median "
                    "run's mean step time is reported (identical runs differ by up to 15%% here)")
    ap.add_argument("--mixes", nargs="+", choices=[m[0] for m in MIXES], help="run only these mixes")
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
    for mix, source, max_len, memory in (m for m in MIXES if not args.mixes or m[0] in args.mixes):
        source = tail_source(max_len, memory) if source == "tail" else source
        measured = {}
        for rep in range(args.repeats):  # interleaved: a slow spell of the machine touches both runs alike
            for name, extra in runs(memory, calibration).items():
                out = ROOT / "runs" / "bench-planner" / mix / f"{name}{rep}"
                sets = [f"--set={s}" for s in base(args.steps, max_len, source) + extra + [f"train.output_dir={out}"]]
                subprocess.run([sys.executable, "-m", "seqshard", "launch", str(ROOT / "examples/tiny.yaml"), *sets],
                               env=env, check=True, capture_output=True)
                metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                m = measured.setdefault(name, {"runs_s": [], "peak_mem_mb": 0.0, "losses": [r["loss"] for r in metrics],
                                               "plans": [r.get("plan_phases") for r in metrics]})
                m["runs_s"].append(float(np.mean([r["step_time_s"] for r in metrics[1:]])))
                m["peak_mem_mb"] = max(m["peak_mem_mb"], *(r.get("peak_mem_mb", 0) or 0 for r in metrics))
        for m in measured.values():
            m["step_s"] = float(np.median(m["runs_s"]))
        sets = base(args.steps, max_len, source) + runs(memory, calibration)["adaptive"]
        spec = load_spec(ROOT / "examples/tiny.yaml", sets)
        cm = CostModel.from_model_config(spec.model, get_profile(str(calibration)), bytes_per_element=4)
        pred = predictions(spec, cm, args.steps)
        a, b = np.array(measured["adaptive"]["losses"]), np.array(measured["static_sp2"]["losses"])
        for name in measured:
            m, p = measured[name]["step_s"], pred[name]
            each = measured[name]["runs_s"]
            rows.append({"mix": mix, "max_len": max_len, "memory_tokens": memory, "run": name, "measured_s": m,
                         "runs_s": each, "predicted_s": p, "error": p / m - 1,
                         "peak_mem_mb": measured[name]["peak_mem_mb"], "plans": measured[name]["plans"],
                         "losses": measured[name]["losses"]})
            print(f"{mix:<14}{name:<12} measured {m:7.3f} s (runs {min(each):.3f}-{max(each):.3f})  "
                  f"predicted {p:7.3f} s"
                  f"  error {100 * (p / m - 1):+6.1f}%  peak {measured[name]['peak_mem_mb']:.0f} MB", flush=True)
        plans = [" then ".join(str(g) for g in p) for p in measured["adaptive"]["plans"]]
        print(f"{mix:<14}adaptive plans (group sizes, phases): "
              + ", ".join(f"{p} x{plans.count(p)}" for p in sorted(set(plans))))
        print(f"{mix:<14}adaptive / static sp=2: {measured['adaptive']['step_s'] / measured['static_sp2']['step_s']:.3f}"
              f"  largest loss rel. difference {float(np.max(np.abs(a - b) / np.abs(b))):.2e}", flush=True)
    load = os.getloadavg()
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest |predicted/measured - 1|: {100 * worst:.1f}% (goal 20%); {time.perf_counter() - start:.0f} s; "
          f"load average (1/5/15 min) {load}")
    result = {"machine": "2 CPU cores, 2 gloo ranks", "calibration": record, "steps": args.steps,
              "repeats": args.repeats, "rows": rows,
              "largest_abs_error": worst, "load_average_after": load}
    (ROOT / "bench/results/planner_measured.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
