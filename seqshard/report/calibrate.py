"""``seqshard calibrate``: fit the cost model's hardware profile on the machine at hand.

Without a model: sustained matmul FLOP/s at transformer-like shapes (the compute term) and,
over a real 2-process gloo/NCCL group on this host, all-to-all bandwidth and per-collective
latency (the communication terms).

With a model (``seqshard calibrate --spec SPEC``), every term is fitted by measuring that model:
- the analytic terms, for group sizes the machine cannot run: effective FLOP/s and a fixed cost
  per micro-batch from forward + backward on one process (``t = overhead + FLOPs(L) / F``), and
  all-to-all latency and bandwidth over 2 processes (``latency_by_group_size``,
  ``bw_by_group_size``);
- per group size and method the machine can run (1: local; 2: Ulysses, Ring), one micro-batch's
  seconds ``c0 + c1 T + c2 sum(L^2) + c3 docs`` (``microbatch_fit``), timed on 2 processes through
  the adaptive runtime's own attention path (:func:`measure_microbatches`);
- those fits scaled, and the per-step cost set, from short 2-rank training runs of the spec itself
  (:func:`fit_trainer_runs`), and the adaptive runtime's extra per-step cost from an adaptive run
  (``adaptive_step_s``).
Saved with ``--out FILE.json``, ``parallel.planner.profile: FILE.json`` makes the adaptive
planner use the fit (refused on another machine kind or model shape).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def measure_flops(dim: int = 512, tokens: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(tokens, dim), torch.randn(dim, 4 * dim)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2.0 * tokens * dim * 4 * dim * repeat / (time.perf_counter() - start)


def _fastest(call, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _all_to_all_worker(rank, init_file, nbytes, repeat, queue, grad_bytes=0):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x = torch.zeros(nbytes // 4)
    out = torch.empty_like(x)
    small, small_out = torch.zeros(2), torch.empty(2)
    dist.all_to_all_single(out, x)  # warm-up
    dist.barrier()
    # the fastest of several timed calls: other jobs on the machine only ever add time
    big = _fastest(lambda: dist.all_to_all_single(out, x), repeat)
    latency = _fastest(lambda: dist.all_to_all_single(small_out, small), 4 * repeat)
    reduce_s = 0.0
    if grad_bytes:
        grads = torch.zeros(grad_bytes // 4)
        dist.all_reduce(grads)
        start = time.perf_counter()
        for _ in range(repeat):
            dist.all_reduce(grads)
        reduce_s = (time.perf_counter() - start) / repeat
    if rank == 0:
        queue.put((nbytes / 2 / max(big - latency, 1e-9), latency, reduce_s))  # half the buffer leaves the rank
    dist.destroy_process_group()


def measure_all_to_all(nbytes: int = 16 * 2**20, repeat: int = 5, grad_bytes: int = 0):
    """(bandwidth B/s, latency s) of all-to-all over 2 processes; with ``grad_bytes`` also the
    seconds of an all-reduce of that many bytes, as a third value."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_all_to_all_worker,
                             args=(r, os.path.join(tmp, "rdv"), nbytes, repeat, queue, grad_bytes))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        bw, latency, reduce_s = queue.get()
        return (bw, latency, reduce_s) if grad_bytes else (bw, latency)


def measure_compute(model_cfg, lengths=(128, 256, 512, 1024), repeat: int = 3) -> dict:
    """Forward + backward of the model over one document of each length, one thread; the fit
    ``t = overhead + FLOPs(L) / F`` by least squares, and the AdamW step's seconds."""
    from seqshard.models import build_model
    from seqshard.models.context import VarlenContext
    from seqshard.parallel.cost_model import CostModel
    from seqshard.parallel.hardware import get_profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(model_cfg)
        times = []
        for length in lengths:
            tokens = torch.randint(0, model_cfg.vocab_size, (length,))
            positions = torch.arange(length)
            ctx = VarlenContext.from_lengths([length])
            samples = []
            for i in range(repeat + 1):
                start = time.perf_counter()
                model(tokens, positions, ctx, labels=tokens).backward()
                if i:  # the first call warms up
                    samples.append(time.perf_counter() - start)
            times.append(min(samples))  # the least disturbed run: other jobs only ever add time
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        opt.step()
        start = time.perf_counter()
        for _ in range(repeat):
            opt.step()
        adam_s = (time.perf_counter() - start) / repeat
        n_params = sum(p.numel() for p in model.parameters())
    finally:
        torch.set_num_threads(threads)
    flops = CostModel.from_model_config(model_cfg, get_profile("cpu_gloo")).flops(np.asarray(lengths, float))
    slope, overhead = np.polyfit(flops, np.asarray(times), 1)
    return {"flops_per_s": 1.0 / max(slope, 1e-30), "microbatch_overhead_s": max(float(overhead), 0.0),
            "adam_s": adam_s, "n_params": n_params, "lengths": list(lengths), "seconds": times}


def _compute_worker(rank, model_cfg, queue):
    queue.put((rank, measure_compute(model_cfg)))


def measure_compute_side_by_side(model_cfg, ranks: int = 2) -> dict:
    """:func:`measure_compute` in ``ranks`` processes at once, as the ranks of a launch run
    (sharing the cores' caches and memory bandwidth); the slowest process's fit."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_compute_worker, args=(r, model_cfg, queue)) for r in range(ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    fits = [queue.get()[1] for _ in range(ranks)]
    return min(fits, key=lambda f: f["flops_per_s"])


# (tokens, document length) of the micro-batches timed per group size and method: single documents
# give the per-token and fixed terms, packed short ones separate the attention (sum of L^2) and the
# per-document terms (attention runs document by document)
MICROBATCH_CASES = ((256, 256), (512, 512), (1024, 1024), (2048, 2048), (1024, 128), (2048, 256), (1024, 32),
                    (2048, 64))


def _time_microbatches(model, args, repeat: int) -> float:
    samples = []
    for i in range(repeat + 1):
        dist.barrier()  # both ranks start together, as in a step
        start = time.perf_counter()
        model(*args).backward()
        if i:  # the first call warms up
            samples.append(time.perf_counter() - start)
    return min(samples)  # the least disturbed run: other jobs only ever add time


def _microbatch_worker(rank, init_file, model_cfg, cases, repeat, queue):
    """Forward + backward of packed micro-batches through the adaptive runtime's own path: each
    rank alone (``local``: a group of one, both ranks side by side as in a data-parallel step),
    then Ulysses and Ring over both ranks (a group of two); then the per-step work (gradient
    all-reduce, clipping, AdamW, the loss all-reduce)."""
    torch.set_num_threads(1)  # one thread per rank, as a launch on this machine runs
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from seqshard.models import build_model
    from seqshard.models.context import VarlenContext
    from seqshard.parallel.adaptive import AdaptiveContext, install_adaptive
    from seqshard.parallel.plan import ShardPlan

    torch.manual_seed(0)
    model = build_model(model_cfg)
    install_adaptive(model)
    group = dist.new_group([0, 1])
    times = {}
    for method in ("local", "ulysses", "ring"):
        for tokens, doc in cases:
            lens = [doc] * (tokens // doc)
            ids = torch.randint(0, model_cfg.vocab_size, (tokens,))
            pos = torch.cat([torch.arange(n) for n in lens])
            if method == "local":
                args = (ids, pos, VarlenContext.from_lengths(lens), ids)
            else:  # the layouts AdaptiveScatter uses
                shard = ShardPlan.build([0, *np.cumsum(lens).tolist()], 2,
                                        "contiguous" if method == "ulysses" else "zigzag")
                args = (shard.shard(ids, rank), shard.shard(pos, rank),
                        AdaptiveContext(plan=shard, group=group, method=method), shard.shard(ids, rank, pad_value=-100))
            times[(method, tokens, doc)] = _time_microbatches(model, args, repeat)
    params = [p for p in model.parameters() if p.grad is not None]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        dist.all_reduce(torch.zeros((), dtype=torch.float64))

    step()
    step_s = _fastest(step, repeat)
    if rank == 0:
        queue.put((times, step_s))
    dist.destroy_process_group()


def fit_microbatches(times: dict) -> list:
    """``[size, method, c0, c1, c2, c3]`` per method: least squares of the RELATIVE error of
    ``t = c0 + c1 T + c2 sum(L^2) + c3 docs`` over the cases (T tokens in T / L documents of
    length L; relative, so the short micro-batches count as much as the long ones), coefficients
    kept >= 0."""
    fits = []
    for method, size in (("local", 1), ("ulysses", 2), ("ring", 2)):
        rows = [(tokens, doc, t) for (m, tokens, doc), t in times.items() if m == method]
        t = np.array([r[2] for r in rows])
        a = np.array([[1.0, n, n * doc, n / doc] for n, doc, _ in rows]) / t[:, None]
        t = np.ones(len(rows))
        coef = np.linalg.lstsq(a, t, rcond=None)[0]
        while (coef < 0).any():  # refit without the terms that came out negative (noise)
            keep = coef > 0
            coef = np.zeros(4)
            coef[keep] = np.linalg.lstsq(a[:, keep], t, rcond=None)[0]
        fits.append([size, method, *coef.tolist()])
    return fits


def measure_microbatches(model_cfg, repeat: int = 5, cases=MICROBATCH_CASES) -> dict:
    """Per group size and method, the fit of one micro-batch's seconds (:func:`fit_microbatches`)
    from 2 processes running the adaptive runtime's path, and the per-step seconds."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_microbatch_worker,
                             args=(r, os.path.join(tmp, "rdv"), model_cfg, cases, repeat, queue)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        times, step_s = queue.get()
    return {"fits": fit_microbatches(times), "step_s": step_s,
            "cases": [[m, n, doc, t] for (m, n, doc), t in times.items()]}


# the trainer runs of the end-to-end fit: (method, spec overrides), 2 ranks each
TRAINER_RUNS = (("local", ["parallel.sp_method=none", "parallel.sp=1"]),
                ("ulysses", ["parallel.sp_method=ulysses", "parallel.sp=2"]),
                ("ring", ["parallel.sp_method=ring", "parallel.sp=2"]))


def _scale_fits(fits, scale: dict) -> tuple:
    """``microbatch_fit`` entries with every coefficient of a method multiplied by ``scale[method]``."""
    return tuple((size, m, *(scale[m] * c for c in cs)) for size, m, *cs in fits)


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


def fit_trainer_runs(spec_path, overrides, profile: dict, steps: int = 10) -> dict:
    """End-to-end fit on real training: the spec trained for ``steps`` steps on 2 ranks
    (``seqshard launch``) once per layout of :data:`TRAINER_RUNS`, each step's measured time
    set against the prediction of :mod:`seqshard.report.step_model` from ``profile``'s micro-batch
    fits (first step left out):
    - ``scale[method]``: measured over predicted seconds of the steps' micro-batch loops (the
      trainer's ``slowest_micro_batch_s``, the slowest rank's), which takes up what timing
      micro-batches alone misses (the trainer's loop, allocator and cache state, the ranks
      waiting for each other);
    - ``step_s``: the mean of the rest of a step after the slowest loop (batch building, planning, optimizer, loss
      all-reduce, logging), over all runs;
    - ``adaptive_step_s``: the adaptive runtime's own per-step cost (planning on rank 0, the plan's
      broadcast, regrouping, the ranks' gradient all-reduce after unequal groups): the spec
      trained adaptively (max_sp 2, memory_tokens half of max_seq_len, so the longest documents
      need a group of two), planned with the scaled fits; its mean measured minus predicted step.
    Returns ``{"scale": {method: k}, "step_s": s, "adaptive_step_s": a, "runs": [...]}``."""
    from seqshard.launch.spec import load_spec

    fields = {k: v for k, v in profile.items() if k != "measured"}
    runs, rest = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for method, sets in TRAINER_RUNS:
            metrics, predicted = _train_and_predict(spec_path, [*overrides, *sets], {**fields, "step_overhead_s": 0.0},
                                                    steps, os.path.join(tmp, method))
            loop = [m["slowest_micro_batch_s"] for m in metrics]  # a step waits for its slowest rank
            runs.append({"method": method, "step_s": [m["step_time_s"] for m in metrics], "slowest_micro_batch_s": loop,
                         "predicted_s": predicted, "scale": sum(loop) / sum(predicted)})
            rest += [m["step_time_s"] - m["slowest_micro_batch_s"] for m in metrics]
        scale, step_s = {r["method"]: r["scale"] for r in runs}, float(np.mean(rest))
        scaled = {**fields, "step_overhead_s": step_s, "microbatch_fit": _scale_fits(fields["microbatch_fit"], scale)}
        path = os.path.join(tmp, "scaled.json")
        spec = load_spec(spec_path, list(overrides))
        save_profile(scaled, path, spec.model)
        adaptive = [*overrides, "parallel.sp_method=adaptive", "parallel.sp=1", "parallel.max_sp=2",
                    f"parallel.planner.memory_tokens={max(1, spec.data.max_seq_len // 2)}",
                    f"parallel.planner.profile={path}"]
        metrics, predicted = _train_and_predict(spec_path, adaptive, scaled, steps, os.path.join(tmp, "adaptive"))
    measured = [m["step_time_s"] for m in metrics]
    runs.append({"method": "adaptive", "step_s": measured, "predicted_s": predicted})
    return {"scale": scale, "step_s": step_s, "adaptive_step_s": float(np.mean(measured) - np.mean(predicted)),
            "runs": runs}


def calibrate_model(model_cfg, name: str = "calibrated", devices_per_node: int = 2, bytes_per_element: int = 4,
                    spec_path=None, overrides=(), trainer_steps: int = 20):
    """A profile fitted on the model itself (see the module docstring), plus the raw
    measurements under ``"measured"`` (not a profile field: pop it before building one). With
    ``spec_path``, the micro-batch fits are then scaled and the per-step cost set by
    :func:`fit_trainer_runs` on the spec (with ``overrides``) itself."""
    comp = measure_compute_side_by_side(model_cfg)
    bandwidth, latency, reduce_s = measure_all_to_all(grad_bytes=4 * comp["n_params"])
    mb = measure_microbatches(model_cfg)
    profile = {"name": name, "peak_flops": comp["flops_per_s"], "mfu": 1.0, "intra_node_bw": bandwidth,
               "inter_node_bw": bandwidth, "devices_per_node": devices_per_node,
               "memory_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
               "collective_latency_s": latency, "source": "seqshard calibrate --spec: fitted on this machine",
               "bw_by_group_size": ((2, bandwidth),), "latency_by_group_size": ((2, latency),),
               "microbatch_overhead_s": comp["microbatch_overhead_s"], "step_overhead_s": mb["step_s"],
               "microbatch_fit": tuple(tuple(f) for f in mb["fits"])}
    profile["measured"] = {**comp, "all_reduce_grads_s": reduce_s, "microbatches": mb["cases"]}
    if spec_path is not None:
        trainer = fit_trainer_runs(spec_path, overrides, profile, trainer_steps)
        profile["microbatch_fit"] = _scale_fits(mb["fits"], trainer["scale"])
        profile["step_overhead_s"] = trainer["step_s"]
        profile["adaptive_step_s"] = trainer["adaptive_step_s"]
        profile["measured"]["trainer_fit"] = trainer
    return profile


def summarize(profile: dict) -> str:
    """A few readable lines about a ``calibrate_model`` profile (what ``seqshard calibrate --spec`` prints)."""
    lines = ["one micro-batch, seconds = c0 + c1 x tokens + c2 x sum of squared document lengths + c3 x documents:"]
    lines += [f"  group of {size} {method:<8} c0 {1e3 * c[0]:7.2f} ms  c1 {1e6 * c[1]:7.2f} us/token  "
              f"c2 {1e9 * c[2]:7.3f} ns/token^2  c3 {1e3 * (c[3:] or (0.0,))[0]:6.3f} ms/document"
              for size, method, *c in profile.get("microbatch_fit", ())]
    trainer = (profile.get("measured") or {}).get("trainer_fit")
    if trainer:
        scales = ", ".join(f"{m} x{k:.2f}" for m, k in trainer["scale"].items())
        steps = len(trainer["runs"][0]["step_s"]) + 1
        lines.append(f"scaled by {steps}-step 2-rank training runs of the spec ({scales}); "
                     f"per-step cost {1e3 * profile['step_overhead_s']:.1f} ms, "
                     f"{1e3 * profile.get('adaptive_step_s', 0.0):+.1f} ms more per adaptive step")
    lines.append(f"all-to-all over 2 processes: {profile['intra_node_bw'] / 1e9:.2f} GB/s, "
                 f"{1e3 * profile['collective_latency_s']:.3f} ms per call")
    return "\n".join(lines)


def calibrate(name: str = "calibrated", devices_per_node: int = 4) -> dict:
    """A profile dict (the fields of :class:`seqshard.parallel.hardware.HardwareProfile`)."""
    flops = measure_flops()
    bandwidth, latency = measure_all_to_all()
    return {"name": name, "peak_flops": flops, "mfu": 1.0, "intra_node_bw": bandwidth,
            "inter_node_bw": bandwidth, "devices_per_node": devices_per_node,
            "memory_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
            "collective_latency_s": latency, "source": "seqshard calibrate on this machine"}


def machine_kind() -> str:
    """What a calibration is only valid on: the accelerator (or CPU architecture) and core count."""
    import platform

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu:{platform.machine()} x{os.cpu_count()}"


def model_shape(cfg) -> dict:
    return {k: int(getattr(cfg, k)) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")}


class CalibrationError(ValueError):
    """A calibration file that does not describe this machine or model; one line for the user."""


def save_profile(profile: dict, path, model=None) -> None:
    """The profile with the machine kind (and the model shape, when given) it was measured for."""
    fields = {k: v for k, v in profile.items() if k != "measured"}
    record = {"profile": fields, "machine": machine_kind(), "model_shape": model_shape(model) if model else None,
              "measured": profile.get("measured")}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def load_calibration(path, model=None):
    """The :class:`HardwareProfile` of a calibration file, refused when it was measured on another
    machine kind or for another model shape (its numbers would not describe this run)."""
    from seqshard.parallel.hardware import HardwareProfile

    with open(path) as f:
        record = json.load(f)
    if record.get("machine") != machine_kind():
        raise CalibrationError(f"{path}: calibrated on {record.get('machine')!r}, this machine is "
                               f"{machine_kind()!r}; run `seqshard calibrate --out {path}` here")
    shape = record.get("model_shape")
    if model is not None and shape is not None and shape != model_shape(model):
        raise CalibrationError(f"{path}: calibrated for model shape {shape}, this run's is {model_shape(model)}; "
                               "recalibrate for this model")
    from seqshard.parallel.hardware import get_profile

    return get_profile(str(path)) if str(path).endswith(".json") else HardwareProfile(**record["profile"])
