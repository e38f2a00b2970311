"""The end-to-end step of ``seqshard calibrate --spec``: the micro-batch curves measured by
:mod:`seqshard.report.calibrate` set against short 2-rank training runs of the spec itself
(``seqshard launch``), which scale the curves per method and give the per-step costs."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .calibration_file import save_profile


# the trainer runs of the end-to-end fit: (method, spec overrides), 2 ranks each
TRAINER_RUNS = (("local", ["parallel.sp_method=none", "parallel.sp=1"]),
                ("ulysses", ["parallel.sp_method=ulysses", "parallel.sp=2"]),
                ("ring", ["parallel.sp_method=ring", "parallel.sp=2"]))


def scale_curves(curves, scale: dict) -> tuple:
    """``microbatch_curve`` entries with a method's fixed and per-token seconds multiplied by ``scale[method]``."""
    return tuple((size, m, scale[m] * c0, tuple((doc, scale[m] * h) for doc, h in points))
                 for size, m, c0, points in curves)


def _train_and_predict(spec_path, sets, profile_fields: dict, steps: int, out: str):
    """Train the spec with ``sets`` for ``steps`` steps on 2 ranks (``seqshard launch``, one thread
    per rank); (its metrics, the predicted step seconds from ``profile_fields``), first step left out."""
    import subprocess
    import sys

    from seqshard.launch.spec import load_spec
    from seqshard.parallel.cost_model import CostModel
    from seqshard.parallel.hardware import HardwareProfile

    from .step_model import predict_steps

    sets = [*sets, f"train.steps={steps}", "train.checkpoint_every=0", "launch.nproc_per_node=2",
            "train.log_every=1000000", f"train.output_dir={out}"]
    subprocess.run([sys.executable, "-m", "seqshard", "launch", str(spec_path), *[f"--set={x}" for x in sets]],
                   env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, capture_output=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f][1:]
    spec = load_spec(spec_path, sets)
    cm = CostModel.from_model_config(spec.model, HardwareProfile(**profile_fields),
                                     2 if spec.train.dtype == "bfloat16" else 4)
    return metrics, predict_steps(spec, cm, 2, steps)[1:]


def fit_trainer_runs(spec_path, overrides, profile: dict, stages, steps: int = 10, repeats: int = 3) -> dict:
    """End-to-end fit on real training: the spec trained for ``steps`` steps on 2 ranks
    (``seqshard launch``) ``repeats`` times per layout of :data:`TRAINER_RUNS` (interleaved, so a
    slow spell of the machine touches every layout alike), each step's measured time set against
    the prediction of :mod:`seqshard.report.step_model` from ``profile``'s micro-batch curves
    (first step left out). Identical runs differ by up to 15% on a shared 2-core machine, so each
    figure is the median over the repeats:
    - ``scale[method]``: measured over predicted seconds of the steps' micro-batch loops (the
      trainer's ``slowest_micro_batch_s``, the slowest rank's), which takes up what timing
      micro-batches alone misses (the trainer's loop, allocator and cache state, the ranks
      waiting for each other);
    - ``step_s``: the rest of a step after the slowest loop (batch building, planning, optimizer,
      loss gather, logging), the median over all static runs of each run's mean;
    - ``adaptive_step_s``: the adaptive runtime's own per-step cost (planning on rank 0, the plan's
      broadcast, regrouping, the ranks' gradient all-reduce after unequal groups): the spec
      trained adaptively (max_sp 2, memory_tokens half of max_seq_len, so the longest documents
      need a group of two), planned with the scaled curves; measured minus predicted mean step.
    ``stages``: the caller's progress (``start(what)`` and ``finish()`` around each training run).
    Returns ``{"scale": {method: k}, "step_s": s, "adaptive_step_s": a, "runs": [...]}``."""
    from seqshard.launch.spec import load_spec

    fields = {k: v for k, v in profile.items() if k != "measured"}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for method, sets in TRAINER_RUNS:
                stages.start(f"training run, {method} {r + 1}/{repeats}")
                metrics, predicted = _train_and_predict(spec_path, [*overrides, *sets],
                                                        {**fields, "step_overhead_s": 0.0}, steps,
                                                        os.path.join(tmp, f"{method}{r}"))
                loop = [m["slowest_micro_batch_s"] for m in metrics]  # a step waits for its slowest rank
                step = [m["step_time_s"] for m in metrics]
                runs.append({"method": method, "step_s": step, "slowest_micro_batch_s": loop,
                             "predicted_s": predicted, "scale": sum(loop) / sum(predicted),
                             "rest_s": float(np.mean(step) - np.mean(loop))})
                stages.finish()
        scale = {m: float(np.median([r["scale"] for r in runs if r["method"] == m])) for m, _ in TRAINER_RUNS}
        step_s = float(np.median([r["rest_s"] for r in runs]))
        scaled = {**fields, "step_overhead_s": step_s,
                  "microbatch_curve": scale_curves(fields["microbatch_curve"], scale)}
        path = os.path.join(tmp, "scaled.json")
        spec = load_spec(spec_path, list(overrides))
        save_profile(scaled, path, spec.model)
        adaptive = [*overrides, "parallel.sp_method=adaptive", "parallel.sp=1", "parallel.max_sp=2",
                    f"parallel.planner.memory_tokens={max(1, spec.data.max_seq_len // 2)}",
                    f"parallel.planner.profile={path}"]
        extra = []
        for r in range(repeats):
            stages.start(f"training run, adaptive {r + 1}/{repeats}")
            metrics, predicted = _train_and_predict(spec_path, adaptive, scaled, steps,
                                                    os.path.join(tmp, f"adaptive{r}"))
            stages.finish()
            measured = [m["step_time_s"] for m in metrics]
            runs.append({"method": "adaptive", "step_s": measured, "predicted_s": predicted})
            extra.append(float(np.mean(measured) - np.mean(predicted)))
    return {"scale": scale, "step_s": step_s, "adaptive_step_s": float(np.median(extra)), "runs": runs}
