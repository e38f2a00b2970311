"""Hardware profiles for the cost model: per-device compute and the links a group spans.

Figures are datasheet peaks scaled by an achievable fraction; ``seqshard calibrate`` fits a
profile on the machine at hand instead.
Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOP/s dense BF16, NVLink 4 at
900 GB/s bidirectional = 450 GB/s per direction, 80 GB HBM3); NVIDIA A100 datasheet (SXM4:
312 TFLOP/s dense BF16, NVLink 3 at 600 GB/s bidirectional, 80 GB); NVIDIA ConnectX-7 (400 Gb/s
NDR InfiniBand per GPU = 50 GB/s) and ConnectX-6 (200 Gb/s HDR = 25 GB/s).
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: float  # per device, dense bf16 (or fp32 on CPU), FLOP/s
    mfu: float  # achievable fraction of the peak on transformer layers
    intra_node_bw: float  # bytes/s per device per direction inside a node
    inter_node_bw: float  # bytes/s per device per direction across nodes
    devices_per_node: int
    memory_bytes: float  # per device
    collective_latency_s: float  # fixed cost of one collective call
    source: str = ""
    # measured all-to-all bandwidth per group size, ((size, bytes/s), ...) ascending; when set it
    # replaces the intra/inter-node rule for every group size (the entry of the largest listed
    # size <= d applies)
    bw_by_group_size: tuple = ()
    # measured per-collective latency per group size, ((size, seconds), ...) ascending (as above)
    latency_by_group_size: tuple = ()
    # fitted fixed costs: per micro-batch (launch, Python), and per step (optimizer, grad sync)
    microbatch_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    # measured seconds of one micro-batch per group size and method, ((size, method, c0,
    # ((L, s), ...)), ...): c0 + the sum over its documents of L x the per-token seconds s of
    # documents of length L (between the measured lengths linear, past the last extrapolated;
    # ``seqshard calibrate --spec``); where present it replaces the FLOP/s and bandwidth terms for
    # that size and method
    microbatch_curve: tuple = ()
    # measured extra seconds of an adaptive step over a static one (planning, regrouping, the ranks
    # waiting for each other after unequal groups): from ``seqshard calibrate --spec``'s adaptive run
    adaptive_step_s: float = 0.0

    def with_(self, **changes) -> "HardwareProfile":
        return replace(self, **changes)


PROFILES = {
    "h100_nvlink_ib400": HardwareProfile(
        "h100_nvlink_ib400", peak_flops=989e12, mfu=0.45, intra_node_bw=450e9, inter_node_bw=50e9,
        devices_per_node=8, memory_bytes=80 * 2**30, collective_latency_s=20e-6,
        source="H100 SXM5 datasheet; NVLink 4 450 GB/s/direction; ConnectX-7 400 Gb/s per GPU"),
    "a100_nvlink_ib200": HardwareProfile(
        "a100_nvlink_ib200", peak_flops=312e12, mfu=0.45, intra_node_bw=300e9, inter_node_bw=25e9,
        devices_per_node=8, memory_bytes=80 * 2**30, collective_latency_s=25e-6,
        source="A100 SXM4 datasheet; NVLink 3 300 GB/s/direction; ConnectX-6 200 Gb/s per GPU"),
    # This development machine (2 CPU cores, gloo over loopback), from `seqshard calibrate` run
    # here on 2026-11-23: 1.6e11 FLOP/s fp32 matmul (both cores), all-to-all 1.04 GB/s, 0.46 ms
    # per collective. mfu 0.1: a tiny-model training step (one thread per rank, small matmuls,
    # Python overhead) reaches about 16 GFLOP/s here (seqshard simulate --calibrate-from).
    "cpu_gloo": HardwareProfile(
        "cpu_gloo", peak_flops=1.6e11, mfu=0.1, intra_node_bw=1.04e9, inter_node_bw=1.04e9,
        devices_per_node=4, memory_bytes=8 * 2**30, collective_latency_s=4.6e-4,
        source="seqshard calibrate on a 2-core CPU machine (gloo, loopback)"),
    # FlexSP (Wang et al., ASPLOS 2025), Table/figure of measured all-to-all bandwidth on their
    # A100 cluster per SP group size: 2: 154, 4: 137, 8: 121, 16: 8.7 GB/s (across nodes).
    "a100_flexsp": HardwareProfile(
        "a100_flexsp", peak_flops=312e12, mfu=0.45, intra_node_bw=121e9, inter_node_bw=8.7e9,
        devices_per_node=8, memory_bytes=80 * 2**30, collective_latency_s=25e-6,
        source="FlexSP paper: measured all-to-all bandwidth per group size on its A100 cluster",
        bw_by_group_size=((2, 154e9), (4, 137e9), (8, 121e9), (16, 8.7e9))),
}


def get_profile(name: str) -> HardwareProfile:
    """A named profile, or the profile of a ``seqshard calibrate --out FILE.json`` file (the
    launcher checks first that the file matches this machine and model: launch/validate.py)."""
    if name.endswith(".json"):
        import json

        with open(name) as f:
            fields = json.load(f)["profile"]
        if "microbatch_fit" in fields:
            raise ValueError(f"{name}: written by an older seqshard (its micro-batch fits are polynomials, now "
                             "measured curves); recalibrate: seqshard calibrate --spec SPEC --out FILE")
        for key in ("bw_by_group_size", "latency_by_group_size"):
            fields[key] = tuple(tuple(pair) for pair in fields.get(key, ()))
        fields["microbatch_curve"] = tuple((size, method, c0, tuple(tuple(p) for p in points))
                                           for size, method, c0, points in fields.get("microbatch_curve", ()))
        return HardwareProfile(**fields)
    if name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; known: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]
