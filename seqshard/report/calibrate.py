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
  seconds as a fixed cost plus, per document of length L, L x a per-token cost measured at that
  length (``microbatch_curve``), timed on 2 processes through the adaptive runtime's own
  attention path (:func:`measure_microbatches`). A curve, not a polynomial: the CPU flash
  kernel's cost per token jumps where its tiling changes;
- those curves scaled, and the per-step cost set, from short 2-rank training runs of the spec
  itself (:mod:`seqshard.report.calibrate_trainer`), and the adaptive runtime's extra per-step
  cost from an adaptive run (``adaptive_step_s``).
Saved with ``--out FILE.json`` (:mod:`seqshard.report.calibration_file`),
``parallel.planner.profile: FILE.json`` makes the adaptive planner use the curves (refused on
another machine kind or model shape).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from .calibrate_trainer import TRAINER_RUNS, fit_trainer_runs, scale_curves


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


class _Stages:
    """A calibration's progress: a tqdm bar on a terminal; elsewhere (a pipe, a log file) one line
    per stage on stderr."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.bar = tqdm(total=total, unit="stage", dynamic_ncols=True) if sys.stderr.isatty() else None

    def start(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description(what)
        else:
            print(f"calibrate [{self.done + 1}/{self.total}]: {what}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _in_processes(target, args, timeout_s: float, what: str) -> list:
    """``target(rank, rendezvous_file, *args, queue)`` in 2 spawned processes (the ranks of a
    launch on this machine); what they put in the queue. A process that fails, or is still running
    after ``timeout_s``, is an error naming the measurement (its traceback is printed above)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(r, os.path.join(tmp, "rdv"), *args, queue)) for r in range(2)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for rank, p in enumerate(procs):
            if p.exitcode != 0:
                for q in procs:
                    q.kill()
                why = f"did not finish in {timeout_s:.0f} s" if p.exitcode is None else f"exited with {p.exitcode}"
                raise RuntimeError(f"calibration ({what}): process {rank} {why}")
        out = []
        while not queue.empty():
            out.append(queue.get())
        return out


def _all_to_all_worker(rank, init_file, nbytes, repeat, grad_bytes, queue):
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
    (bw, latency, reduce_s), = _in_processes(_all_to_all_worker, (nbytes, repeat, grad_bytes), 120, "all-to-all")
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


def _compute_worker(rank, init_file, model_cfg, queue):
    queue.put(measure_compute(model_cfg))


def measure_compute_side_by_side(model_cfg) -> dict:
    """:func:`measure_compute` in 2 processes at once, as the ranks of a launch run (sharing the
    cores' caches and memory bandwidth); the slowest process's fit."""
    fits = _in_processes(_compute_worker, (model_cfg,), 300, "compute")
    return min(fits, key=lambda f: f["flops_per_s"])


# the micro-batches timed per group size and method: documents of each length in CURVE_LENGTHS
# packed into up to CURVE_TOKENS tokens. The lengths are dense where PyTorch's CPU flash kernel
# changes its tiling (a document's attention cost is not smooth in L: its query and key blocks
# change size at a few lengths), the token counts separate the fixed cost from the per-token one
CURVE_LENGTHS = (32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
CURVE_TOKENS = (512, 1024, 2048)
MICROBATCH_CASES = tuple((tokens, doc) for tokens in CURVE_TOKENS for doc in CURVE_LENGTHS if doc <= tokens)


def _time_microbatches(model, cases: dict, repeat: int) -> dict:
    """Seconds of forward + backward per case (``{key: model args}``): ``repeat`` passes over every
    case after a warm-up pass, each case's median. One case after another, as a run's micro-batches
    change shape from one to the next, and the median, as a run's mean pays the machine's
    disturbances too (the trainer's loop took 1.13-1.30x the least disturbed of 5)."""
    samples = {key: [] for key in cases}
    for i in range(repeat + 1):
        for key, args in cases.items():
            dist.barrier()  # both ranks start together, as in a step
            start = time.perf_counter()
            model(*args).backward()
            if i:  # the first pass warms up
                samples[key].append(time.perf_counter() - start)
    return {key: float(np.median(s)) for key, s in samples.items()}


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
        args_of = {}
        for tokens, doc in cases:
            lens = [doc] * (tokens // doc)
            ids = torch.randint(0, model_cfg.vocab_size, (sum(lens),))
            pos = torch.cat([torch.arange(n) for n in lens])
            if method == "local":
                args = (ids, pos, VarlenContext.from_lengths(lens), ids)
            else:  # the layouts AdaptiveScatter uses
                shard = ShardPlan.build([0, *np.cumsum(lens).tolist()], 2,
                                        "contiguous" if method == "ulysses" else "zigzag")
                args = (shard.shard(ids, rank), shard.shard(pos, rank),
                        AdaptiveContext(plan=shard, group=group, method=method), shard.shard(ids, rank, pad_value=-100))
            args_of[(method, tokens, doc)] = args
        times.update(_time_microbatches(model, args_of, repeat))
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
    """``(size, method, c0, ((L, s), ...))`` per method (``HardwareProfile.microbatch_curve``):
    one micro-batch of ``n`` documents of length L (``tokens // L`` of them) takes
    ``c0 + n L s(L)``; least squares of the RELATIVE error over the cases (so the short
    micro-batches count as much as the long ones), one ``c0`` per method and one per-token ``s``
    per length, all kept >= 0."""
    fits = []
    for method, size in (("local", 1), ("ulysses", 2), ("ring", 2)):
        rows = [(tokens // doc * doc, doc, t) for (m, tokens, doc), t in times.items() if m == method]
        lengths = sorted({doc for _, doc, _ in rows})
        a = np.zeros((len(rows), 1 + len(lengths)))
        for k, (n, doc, t) in enumerate(rows):
            a[k, 0], a[k, 1 + lengths.index(doc)] = 1.0 / t, n / t
        coef = np.linalg.lstsq(a, np.ones(len(rows)), rcond=None)[0]
        while (coef < 0).any():  # refit without the terms that came out negative (noise)
            keep = coef > 0
            coef = np.zeros(len(coef))
            coef[keep] = np.linalg.lstsq(a[:, keep], np.ones(len(rows)), rcond=None)[0]
        fits.append((size, method, float(coef[0]), tuple((doc, float(h)) for doc, h in zip(lengths, coef[1:]))))
    return tuple(fits)


def measure_microbatches(model_cfg, repeat: int = 5, cases=MICROBATCH_CASES) -> dict:
    """Per group size and method, the curve of one micro-batch's seconds (:func:`fit_microbatches`)
    from 2 processes running the adaptive runtime's path, and the per-step seconds."""
    (times, step_s), = _in_processes(_microbatch_worker, (model_cfg, cases, repeat), 900, "micro-batches")
    return {"curves": fit_microbatches(times), "step_s": step_s,
            "cases": [[m, n, doc, t] for (m, n, doc), t in times.items()]}


def calibrate_model(model_cfg, name: str = "calibrated", devices_per_node: int = 2, bytes_per_element: int = 4,
                    spec_path=None, overrides=(), trainer_steps: int = 20, repeats: int = 3):
    """A profile fitted on the model itself (see the module docstring), plus the raw
    measurements under ``"measured"`` (not a profile field: pop it before building one). With
    ``spec_path``, the micro-batch curves are then scaled and the per-step cost set by
    :func:`~seqshard.report.calibrate_trainer.fit_trainer_runs` on the spec (with ``overrides``) itself."""
    with _Stages(3 + (repeats * (len(TRAINER_RUNS) + 1) if spec_path is not None else 0)) as stages:
        stages.start("compute (2 processes)")
        comp = measure_compute_side_by_side(model_cfg)
        stages.finish()
        stages.start("all-to-all and all-reduce (2 processes)")
        bandwidth, latency, reduce_s = measure_all_to_all(grad_bytes=4 * comp["n_params"])
        stages.finish()
        stages.start("micro-batch curves (local, Ulysses, Ring)")
        mb = measure_microbatches(model_cfg)
        stages.finish()
        profile = {"name": name, "peak_flops": comp["flops_per_s"], "mfu": 1.0, "intra_node_bw": bandwidth,
                   "inter_node_bw": bandwidth, "devices_per_node": devices_per_node,
                   "memory_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                   "collective_latency_s": latency, "source": "seqshard calibrate --spec: fitted on this machine",
                   "bw_by_group_size": ((2, bandwidth),), "latency_by_group_size": ((2, latency),),
                   "microbatch_overhead_s": comp["microbatch_overhead_s"], "step_overhead_s": mb["step_s"],
                   "microbatch_curve": mb["curves"]}
        profile["measured"] = {**comp, "all_reduce_grads_s": reduce_s, "microbatches": mb["cases"]}
        if spec_path is not None:
            trainer = fit_trainer_runs(spec_path, overrides, profile, stages, trainer_steps, repeats)
            profile["microbatch_curve"] = scale_curves(mb["curves"], trainer["scale"])
            profile["step_overhead_s"] = trainer["step_s"]
            profile["adaptive_step_s"] = trainer["adaptive_step_s"]
            profile["measured"]["trainer_fit"] = trainer
    return profile


def summarize(profile: dict) -> str:
    """A few readable lines about a ``calibrate_model`` profile (what ``seqshard calibrate --spec`` prints)."""
    lines = ["one micro-batch, seconds = c0 + per document, its tokens x the per-token cost at its length:"]
    for size, method, c0, points in profile.get("microbatch_curve", ()):
        shown = [(doc, h) for doc, h in points if doc in (32, 256, 512, 1024, 2048)] or list(points)
        lines.append(f"  group of {size} {method:<8} c0 {1e3 * c0:6.2f} ms  us/token at L = "
                     + ", ".join(f"{doc}: {1e6 * h:.1f}" for doc, h in shown))
    trainer = (profile.get("measured") or {}).get("trainer_fit")
    if trainer:
        scales = ", ".join(f"{m} x{k:.2f}" for m, k in trainer["scale"].items())
        steps = len(trainer["runs"][0]["step_s"]) + 1
        repeats = sum(r["method"] == trainer["runs"][0]["method"] for r in trainer["runs"])
        lines.append(f"scaled by {steps}-step 2-rank training runs of the spec, the median of {repeats} per layout "
                     f"({scales}); per-step cost {1e3 * profile['step_overhead_s']:.1f} ms, "
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
