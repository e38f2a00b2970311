"""``seqshard simulate``: PREDICTED step time, MFU and memory per device of each SP method.

An analytic alpha-beta model of one training step (forward + backward) on ``P`` devices, with
the hardware profiles of :mod:`seqshard.parallel.hardware`, drawn
as the same report as measured runs (:mod:`seqshard.report.report`), every title marked
PREDICTED. Load: weak scaling with ``tokens_per_device`` tokens per device: the step holds
``n_seq = max(1, P * T_d // L)`` sequences of ``L`` tokens; ``sp = max(1, P // n_seq)`` devices
share a sequence, ``dp = P / sp`` groups run side by side, each device holds ``n = n_seq L / P``.

Per device and step (``b`` bytes per element: 2 in bf16, 4 in fp32; ``d_kv = n_kv_heads *
head_dim``, ``l`` layers):

- compute = model FLOPs (report.py's formula) / P / (peak * the profile's achievable mfu);
- ulysses (Jacobs et al. 2023): per layer four all-to-alls (q, k, v, o) forward and four
  backward, each device sending ``n (2 d + 2 d_kv) b (sp-1)/sp`` per direction of the pass;
- ring (Liu et al. 2023): ``sp - 1`` hops of a K/V block ``2 n d_kv b`` forward; backward sends
  K/V and dK/dV (2x); overlapped with the layer's attention compute, only the excess shows;
- allgather (Llama 3 CP): all-gather K/V ``(sp-1) 2 n d_kv b`` forward, reduce-scatter dK/dV
  backward; not overlapped;
- usp (Fang & Zhao 2024): ulysses over ``u`` devices inside a node, ring over ``sp / u``;
- lasp2 (Sun et al. 2025): the *linear-attention* variant of the model; one all-gather of the
  ``d * head_dim`` state per layer forward and one backward, independent of ``L``;
- adaptive: Ulysses inside the SP groups chosen by the planner (``plan_step`` with its cost
  model; the largest group when it mixes sizes); a sequence too long for the largest group
  that fits the heads and the memory makes the point impossible. With the uniform lengths
  simulated here it has no heterogeneity to exploit, so it matches ulysses where both run;
- gradient all-reduce over all P devices ``2 (P-1)/P * N * b``: after the backward with
  ``train.engine: torch`` (seqshard's trainer reduces once, not overlapped), hidden behind the
  backward (2/3 of compute) with ``engine: deepspeed`` (its overlapped reduction);
- links: a group inside a node uses the intra-node bandwidth, traffic leaving the node the
  per-device network bandwidth; each message also pays the profile's collective latency;
- memory = :func:`seqshard.parallel.memory_model.predict_peak` on ``cuda`` (the model that
  ``seqshard plan``, validation and ``--memory`` use): model states under the ZeRO stage over P,
  activations under the spec's checkpointing, offload and MLP tiles, attention workspace, the
  method's buffers and the chunked loss.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from seqshard.parallel import memory_model as mm
from seqshard.parallel.cost_model import CostModel
from seqshard.parallel.hardware import HardwareProfile, get_profile
from seqshard.parallel.planner import dividing_sizes, plan_step

from . import report
from seqshard.launch.spec import load_spec

METHODS = ("ulysses", "ring", "usp", "allgather", "lasp2", "adaptive")


class SimulateError(ValueError):
    """Bad simulate input; the message is the one line a user sees."""


def load_profile(name: str) -> HardwareProfile:
    """A profile of :mod:`seqshard.parallel.hardware` (datasheet peaks, links, memory)."""
    try:
        return get_profile(name)
    except ValueError as err:
        raise SimulateError(f"--profile: {err}") from None


def profile_peak_tflops(profile: HardwareProfile) -> float:
    return profile.peak_flops / 1e12


def parse_size(text: str) -> int:
    """``32K`` -> 32768, ``1M`` -> 1048576, ``4096`` -> 4096."""
    t = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise SimulateError(f"{text!r} is not a size like 4096, 32K or 1M") from None
    if value < 1:
        raise SimulateError(f"{text!r} must be >= 1")
    return value


def parse_list(text: str, what: str, parse=parse_size) -> list[int]:
    try:
        return [parse(x) for x in text.split(",") if x.strip()]
    except SimulateError as err:
        raise SimulateError(f"{what}: {err}") from None


def _pow2_le(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


@dataclass(frozen=True)
class Layout:
    method: str
    devices: int
    tokens: int  # global tokens of the step
    sum_sq: float  # sum over sequences of L^2
    sp: int
    ulysses: int = 1  # usp: ulysses degree inside sp
    bytes_per_el: int = 2  # activations and gradients on the wire: 2 bf16, 4 fp32


def _send_s(nbytes: float, group: int, prof: HardwareProfile, messages: int) -> float:
    """Seconds to send ``nbytes`` spread evenly over a group, plus ``messages`` latencies."""
    dpn = prof.devices_per_node
    off_node = max(0, group - dpn) / max(1, group - 1)
    return (nbytes * (1 - off_node) / prof.intra_node_bw + nbytes * off_node / prof.inter_node_bw
            + messages * prof.collective_latency_s)


def _sp_comm(m, lay: Layout, prof: HardwareProfile, n: float, attn_layer_s: float) -> float:
    """Exposed seconds of one step's sequence-parallel communication (all layers, fwd + bwd);
    ``attn_layer_s``: one layer's attention compute, which ring hops hide behind."""
    b, d, dkv, sp = lay.bytes_per_el, m.dim, m.n_kv_heads * m.head_dim, lay.sp
    layers = m.n_layers
    if sp == 1:
        return 0.0
    if lay.method == "ulysses":
        return 2 * layers * _send_s(n * (2 * d + 2 * dkv) * b * (sp - 1) / sp, sp, prof, 4 * (sp - 1))
    if lay.method == "allgather":
        return 2 * layers * _send_s((sp - 1) * 2 * n * dkv * b, sp, prof, sp - 1)
    if lay.method == "lasp2":
        return 2 * layers * _send_s((sp - 1) * d * m.head_dim * b, sp, prof, sp - 1)
    u = lay.ulysses  # 1 for ring
    r = sp // u
    a2a = 2 * layers * _send_s(n * (2 * d + 2 * dkv) * b * (u - 1) / u, u, prof, 4 * (u - 1)) if u > 1 else 0.0
    hop = 2 * n * dkv * b
    link = prof.inter_node_bw if sp > prof.devices_per_node else prof.intra_node_bw
    ring_layer = 3 * (r - 1) * (hop / link + prof.collective_latency_s)
    return a2a + layers * max(0.0, ring_layer - attn_layer_s)


def _device_memory(memory: mm.MemoryConfig | None, lay: Layout, zero_stage: int, sp: int, method: str):
    """The memory model's config on one of ``lay``'s devices: the spec's activation knobs
    (``memory``), states sharded over all of ``lay.devices`` by ``zero_stage``, ``sp``/``method``."""
    b = lay.bytes_per_el
    return replace(memory or mm.MemoryConfig(), sp=sp, sp_method=method if sp > 1 else "none", dp=lay.devices,
                   zero_stage=zero_stage, act_bytes=b, param_bytes=b, device="cuda", offload_states=False)


def _memory_mb(m, lay: Layout, n: float, zero_stage: int, memory: mm.MemoryConfig | None = None) -> float:
    """Peak MiB per device by the memory model; ``memory`` carries the spec's activation knobs."""
    c = _device_memory(memory, lay, zero_stage, lay.sp, lay.method)
    return mm.predict_peak(m, max(1, round(n * lay.sp)), c)["total"] / 2**20


def predict(model, lay: Layout, prof: HardwareProfile, zero_stage: int = 0,
            overlap_grads: bool = False, memory: mm.MemoryConfig | None = None) -> dict:
    """Predicted seconds, MFU and memory of one step (module doc); ``model`` is a ModelConfig."""
    if lay.method == "lasp2" and model.arch == "llama":
        model = replace(model, arch="linear_llama")
    p, n = lay.devices, lay.tokens / lay.devices
    flops = report.model_flops(model, lay.tokens, lay.sum_sq)
    rate = prof.peak_flops * prof.mfu
    compute = flops / p / rate
    softmax_layers, _ = report.layer_counts(model)
    attn_layer_s = 6 * model.dim * lay.sum_sq / p / rate  # one layer's attention, fwd + bwd
    sp_comm = _sp_comm(model, lay, prof, n, attn_layer_s * (softmax_layers > 0))
    n_params = report.matmul_params(model)
    grads = _send_s(2 * (p - 1) / p * n_params * lay.bytes_per_el, p, prof, 2 * (p - 1)) if p > 1 else 0.0
    exposed = sp_comm + (max(0.0, grads - 2 / 3 * compute) if overlap_grads else grads)
    step = compute + exposed
    return {"step_time_s": step, "compute_s": compute, "comm_s": exposed, "comm_fraction": exposed / step,
            "tokens_per_s": lay.tokens / step, "tokens_per_s_per_device": lay.tokens / step / p,
            "tflops_per_device": flops / step / p / 1e12, "mfu": flops / step / p / prof.peak_flops,
            "peak_mem_mb": _memory_mb(model, lay, n, zero_stage, memory)}


def layout(method: str, model, devices: int, seq_len: int, tokens_per_device: int, prof: HardwareProfile,
           bytes_per_el: int = 2, zero_stage: int = 0, memory: mm.MemoryConfig | None = None) -> Layout | str:
    """The method's layout at this point (module doc), or the one-line reason it cannot run there."""
    n_seq = max(1, devices * tokens_per_device // seq_len)
    sp = max(1, devices // n_seq)
    while devices % sp:
        sp -= 1
    base = Layout(method, devices, n_seq * seq_len, float(n_seq) * seq_len**2, sp, 1, bytes_per_el)
    heads = model.n_heads
    if method == "ulysses" and (heads % sp or (model.n_kv_heads % sp and sp % model.n_kv_heads)):
        return f"ulysses: sp {sp} does not divide {heads} heads"
    if method == "usp":
        return replace(base, ulysses=math.gcd(sp, heads, prof.devices_per_node))
    if method == "adaptive":
        return _planned(model, base, n_seq, seq_len, prof, zero_stage, memory)
    return base


def _planned(model, base: Layout, n_seq: int, seq_len: int, prof: HardwareProfile, zero_stage: int,
             memory: mm.MemoryConfig | None = None):
    """adaptive: Ulysses inside the groups that :func:`~seqshard.parallel.planner.plan_step` picks
    (its cost model; memory_tokens: the longest sequence one device holds by the memory model), or why not."""
    c = _device_memory(memory, base, zero_stage, 1, "none")
    cost = CostModel.from_model_config(model, prof, base.bytes_per_el)
    try:
        max_sp = min(base.devices, model.n_heads)
        plan = plan_step([seq_len] * n_seq, base.devices, max_sp=max_sp,
                         memory_tokens=max(1, mm.longest_fitting(model, c, prof.memory_bytes)), cost_model=cost,
                         allowed_sizes=dividing_sizes(base.devices, max_sp))  # one Ulysses degree
    except ValueError as err:
        return f"adaptive: {str(err).split(';')[0]}"
    return replace(base, method="ulysses", sp=max(size for _, size in plan.groups))


def wire_bytes(spec) -> int:
    return 2 if spec.train.dtype == "bfloat16" else 4


def _engine(spec) -> dict:
    """predict()'s keyword arguments that come from the spec's train: section."""
    zero = 3 if spec.train.engine == "fsdp2" else spec.train.zero_stage
    return {"zero_stage": zero, "overlap_grads": spec.train.engine == "deepspeed",
            "memory": mm.config_from_spec(spec, 1, "cuda")}


def grid_rows(spec, prof: HardwareProfile, methods, devices, seq_lens, tokens_per_device) -> tuple[list, list]:
    """(report rows, one line per method with points it cannot run)."""
    rows, skipped = [], []
    engine = _engine(spec)
    for method in methods:
        for seq in seq_lens:
            for p in devices:
                lay = layout(method, spec.model, p, seq, tokens_per_device, prof, wire_bytes(spec),
                             engine["zero_stage"], engine["memory"])
                if isinstance(lay, str):
                    skipped.append((method, f"{lay} (P={p}, L={_size(seq)})"))
                    continue
                pred = predict(spec.model, lay, prof, **engine)
                fits = pred["peak_mem_mb"] <= prof.memory_bytes / 2**20
                rows.append({**pred, "name": f"{method} P={p} L={_size(seq)}", "config": method, "world": p,
                             "layout": f"{p // lay.sp} x {lay.sp}" + (f" (u{lay.ulysses})" if lay.ulysses > 1 else ""),
                             "tokens_per_step": lay.tokens, "group": f"{method} {seq}", "sp_class": "sim",
                             "panel": f"sequence length {_size(seq)}", "fits": "yes" if fits else "NO (OOM)"})
    report.add_scaling(rows)
    for r in rows:
        r["strong_series"] = r["weak_series"] = [r["config"]]
    notes = []
    for method in methods:
        reasons = [why for m, why in skipped if m == method]
        if reasons:
            notes.append(f"{len(reasons)} points not possible, e.g. {reasons[0]}")
    return rows, notes


def _size(n: int) -> str:
    for unit, scale in (("M", 2**20), ("K", 2**10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def fit_profile(runs) -> HardwareProfile:
    """A CPU profile fitted to measured runs: FLOP/s of the 1-rank runs' compute time, and the
    effective bandwidth ``2 (P-1)/P * bytes / seconds`` of the multi-rank runs' collectives."""
    flops = secs = moved = comm_s = 0.0
    for run in runs:
        steps = run.metrics[1:] if len(run.metrics) > 1 else run.metrics
        if run.world_size == 1:
            flops += sum(report.model_flops(run.spec.model, s["tokens"], report.step_sum_sq(s, run.spec))
                         for s in steps)
            secs += sum(s.get("compute_time_s", s["step_time_s"]) for s in steps)
        else:
            p = run.world_size
            moved += sum(2 * (p - 1) / p * s["comm_bytes"] for s in steps)
            comm_s += sum(s["comm_time_s"] for s in steps)
    if not secs or not comm_s:
        raise SimulateError("--calibrate-from: needs a 1-rank run and a multi-rank run to fit a profile")
    return HardwareProfile("fitted", peak_flops=flops / secs, mfu=1.0, intra_node_bw=moved / comm_s,
                           inter_node_bw=moved / comm_s, devices_per_node=1 << 20, memory_bytes=float(2**50),
                           collective_latency_s=0.0, source="fitted to the --calibrate-from runs")


def calibration_rows(runs, profiles: list[HardwareProfile]) -> list[dict]:
    """Each measured run beside its prediction by each profile, at the same layout and load."""
    rows = []
    for run in runs:
        measured = report.summarize(run, profiles[0].peak_flops / 1e12)
        steps = run.metrics[1:] if len(run.metrics) > 1 else run.metrics
        p = run.spec.parallel
        lay = Layout(p.sp_method, run.world_size, round(sum(s["tokens"] for s in steps) / len(steps)),
                     sum(report.step_sum_sq(s, run.spec) for s in steps) / len(steps), p.sp, p.ulysses,
                     wire_bytes(run.spec))
        measured.update(config=f"measured {p.sp_method}", name=f"{run.path.name} measured", ratio=None)
        rows.append(measured)
        for prof in profiles:
            pred = predict(run.spec.model, lay, prof, **_engine(run.spec))
            kind = f"PREDICTED {prof.name}"
            rows.append({**measured, **pred, "config": f"{kind} {p.sp_method}", "name": f"{run.path.name} {kind}",
                         "ratio": pred["step_time_s"] / measured["step_time_s"]})
    for r in rows:
        r["group"] = r["config"]
    report.add_scaling(rows)
    return sorted(rows, key=lambda r: (r["tokens_per_step"] / r["world"], r["world"], r["name"]))


SIM_COLUMNS = [c for c in report.COLUMNS if c[0] not in ("steps", "loss")] + [("fits", "fits memory", "{}")]
CAL_COLUMNS = [c for c in report.COLUMNS if c[0] != "loss"] + [("ratio", "predicted / measured step time", "{:.2f}")]


def _describe(prof: HardwareProfile) -> str:
    return (f"profile {prof.name}: {prof.peak_flops / 1e12:.4g} TFLOP/s peak x {prof.mfu:g} achievable, "
            f"{prof.memory_bytes / 2**30:.4g} GiB, {prof.devices_per_node} devices/node, "
            f"{prof.intra_node_bw / 1e9:.4g} GB/s in a node, {prof.inter_node_bw / 1e9:.4g} GB/s between nodes, "
            f"{prof.collective_latency_s * 1e6:.3g} us per collective")


def run_cli(args) -> int:
    spec = load_spec(args.spec, args.overrides)
    prof = load_profile(args.profile or "h100_nvlink_ib400")
    if args.peak_tflops:
        prof = prof.with_(peak_flops=args.peak_tflops * 1e12)
    if getattr(args, "memory", False):
        from .capacity_sim import memory_cli

        return memory_cli(args, spec, prof.memory_bytes, parse_list(args.devices, "--devices"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SimulateError(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})")
    devices, seqs = parse_list(args.devices, "--devices"), parse_list(args.seq_len, "--seq-len")
    per_device = parse_size(args.tokens_per_device)
    start = time.perf_counter()
    rows, impossible = grid_rows(spec, prof, methods, devices, seqs, per_device)
    notes = ["PREDICTED by the analytic model of seqshard/report/simulate.py: no run behind these numbers",
             _describe(prof), f"model {spec.name}: {spec.model.arch} dim {spec.model.dim}, {spec.model.n_layers} "
             f"layers, {spec.model.n_heads} heads, ZeRO {spec.train.zero_stage}; {_size(per_device)} tokens per "
             "device (weak scaling, one sequence at least); lasp2 is the linear-attention variant of the model",
             *impossible]
    out = Path(args.out)
    report.write_report(rows, out, "seqshard scaling report (PREDICTED)", notes, SIM_COLUMNS)
    print(f"PREDICTED: {len(rows)} points in {time.perf_counter() - start:.1f}s -> {out}/report.md")
    if args.calibrate_from:
        runs = report.find_runs(args.calibrate_from)
        profiles = [load_profile("cpu_gloo"), fit_profile(runs)]
        cal_rows = calibration_rows(runs, profiles)
        report.write_report(cal_rows, out / "calibration", "seqshard calibration: measured vs PREDICTED",
                            [_describe(p) for p in profiles] + [f"MFU against {profiles[0].name}'s peak"],
                            CAL_COLUMNS)
        print(report.markdown_table(cal_rows, CAL_COLUMNS))
    return 0
