"""``seqshard calibrate``: fit the cost model's hardware profile on the machine at hand.

Without a model: sustained matmul FLOP/s at transformer-like shapes (the compute term) and,
over a real 2-process gloo/NCCL group on this host, all-to-all bandwidth and per-collective
latency (the communication terms).

With a model (``seqshard calibrate --spec SPEC``), every term is fitted by measuring that model:
- group size 1 (compute): forward + backward of the model on one process (one thread, as one
  rank of a launch) over single documents of several lengths; least squares of
  ``t = overhead + FLOPs(L) / F`` (FLOPs from the cost model) gives the effective FLOP/s F
  (``peak_flops`` with ``mfu`` 1) and the fixed cost per micro-batch;
- group size 2 (communication): all-to-all over 2 processes at a small and a large message,
  giving that size's per-call latency and bandwidth (``latency_by_group_size``,
  ``bw_by_group_size``);
- per step: the AdamW step over the model's parameters plus an all-reduce of their gradients.
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


def calibrate_model(model_cfg, name: str = "calibrated", devices_per_node: int = 2, bytes_per_element: int = 4):
    """A profile fitted on the model itself (see the module docstring), plus the raw
    measurements under ``"measured"`` (not a profile field: pop it before building one)."""
    comp = measure_compute_side_by_side(model_cfg)
    bandwidth, latency, reduce_s = measure_all_to_all(grad_bytes=4 * comp["n_params"])
    profile = {"name": name, "peak_flops": comp["flops_per_s"], "mfu": 1.0, "intra_node_bw": bandwidth,
               "inter_node_bw": bandwidth, "devices_per_node": devices_per_node,
               "memory_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
               "collective_latency_s": latency, "source": "seqshard calibrate --spec: fitted on this machine",
               "bw_by_group_size": ((2, bandwidth),), "latency_by_group_size": ((2, latency),),
               "microbatch_overhead_s": comp["microbatch_overhead_s"], "step_overhead_s": comp["adam_s"] + reduce_s}
    profile["measured"] = {**comp, "all_reduce_grads_s": reduce_s}
    return profile


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
