"""``seqshard calibrate``: fit the cost model's hardware profile on the machine at hand.

Measures sustained matmul FLOP/s at transformer-like shapes (the compute term) and, over a real
2-process gloo/NCCL group on this host, all-to-all bandwidth and per-collective latency (the
communication terms). The result is a profile dict that ``parallel.planner.profile`` can name
once saved (``--out profile.json``) or that replaces ``cpu_gloo``'s defaults.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

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


def _all_to_all_worker(rank, init_file, nbytes, repeat, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x = torch.zeros(nbytes // 4)
    out = torch.empty_like(x)
    small, small_out = torch.zeros(2), torch.empty(2)
    dist.all_to_all_single(out, x)  # warm-up
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeat):
        dist.all_to_all_single(out, x)
    big = (time.perf_counter() - start) / repeat
    start = time.perf_counter()
    for _ in range(repeat):
        dist.all_to_all_single(small_out, small)
    latency = (time.perf_counter() - start) / repeat
    if rank == 0:
        queue.put((nbytes / 2 / max(big - latency, 1e-9), latency))  # half the buffer leaves the rank
    dist.destroy_process_group()


def measure_all_to_all(nbytes: int = 16 * 2**20, repeat: int = 5) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_all_to_all_worker, args=(r, os.path.join(tmp, "rdv"), nbytes, repeat, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        return queue.get()


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
    record = {"profile": profile, "machine": machine_kind(), "model_shape": model_shape(model) if model else None}
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
    return HardwareProfile(**record["profile"])
