"""SP attention on 4 gloo ranks: time, communication and peak memory of each method (issue #4).

One causal attention layer, fwd + bwd, fp32, H = 8 heads (= kv heads), head_dim D = 64, on a
packed batch of T tokens (documents of at most ``max_doc`` tokens, every length a multiple of
2P so no ShardPlan padding), for: ulysses, ring (contiguous, zigzag), allgather, usp (2 x 2) and
DeepSpeed's ``deepspeed.sequence.layer.DistributedAttention`` wrapping the same local attention
(the torch varlen reference, ``seqshard.kernels.attention``). Each (T, method) runs in freshly
spawned ranks (``tests.helpers.ranks.run_ranks``, file:// rendezvous, 1 thread per rank).

Measured:
- wall: fwd+bwd seconds, max over ranks of each rep, median over ``--reps`` after one warm-up.
- comm time: seqshard methods from ``COMM_LOG`` (synchronous collective time; for ring the
  time left waiting on a transfer that compute did not hide). Independently, for every method
  including DeepSpeed, ``torch.distributed.all_to_all_single`` / ``all_gather_single`` /
  ``batch_isend_irecv`` (+ waits) are wrapped during the timed reps: "wrapped" seconds and bytes.
  The Ulysses-vs-DeepSpeed goal compares the wrapped all_to_all_single seconds of both.
- bytes sent per rank (logical, as handed to the collective): all-to-all ``(P-1)/P`` of its
  input, all-gather ``(P-1)`` x its input, p2p the sent tensor.
- peak memory: ``ru_maxrss`` after the warm-up fwd+bwd minus the current RSS (/proc/self/statm)
  just before it, in each fresh process; against a fresh 1-process run (the same reference
  attention over all T tokens, 1 thread).

Analytic minima (bytes sent per rank; N = T/P local tokens, E = N*H*D*4 bytes = one local
q/k/v/o tensor, P = 4; each is the least the *algorithm* must move, with O(N) memory):
- ulysses: fwd a2a of q,k,v and of o, bwd a2a of dout and dq,dk,dv: ``8 E (P-1)/P``.
- deepspeed: the same data in 4 + 4 separate a2a's: ``8 E (P-1)/P``.
- ring: K/V block = 2E; fwd P-1 K/V hops; bwd P-1 K/V hops + P dK/dV hops (the accumulators
  must travel home): ``(3P-2) 2E``. (Causal blocks that are fully masked still travel.)
- allgather: fwd all-gather of K,V ``(P-1) 2E``; bwd reduce-scatter of dK,dV ``(P-1) 2E``:
  ``4 (P-1) E``.
- usp (U x R, U = R = 2): ulysses over U (``8 E (U-1)/U``) + ring over R on U*N tokens x H/U
  heads (block 2E): ``(3R-2) 2E``.
Any method's information lower bound is smaller (e.g. every rank must receive (P-1)/P of the
K/V it lacks), so a ratio of 1.0 means "no waste relative to the algorithm", nothing more.

    python bench/sp_attention.py            # quick: T = 4K, 16K; documents <= 2K tokens
    python bench/sp_attention.py --full     # T = 16K, 64K; documents <= 8K tokens (large)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.ranks import run_ranks  # noqa: E402

H, D, P, BYTES = 8, 64, 4, 4
METHODS = ["ulysses", "ring_contiguous", "ring_zigzag", "allgather", "usp_2x2", "deepspeed"]
LAYOUT = {"ulysses": "contiguous", "ring_contiguous": "contiguous", "ring_zigzag": "zigzag",
          "allgather": "zigzag", "usp_2x2": "zigzag", "deepspeed": "stream"}


def doc_lengths(total: int, max_doc: int) -> list[int]:
    """Packed batch: repeats of [max, max/2, max/4, max/4] tokens (all multiples of 2P)."""
    pattern = [max_doc, max_doc // 2, max_doc // 4, max_doc // 4]
    out = []
    while sum(out) < total:
        out.append(min(pattern[len(out) % 4], total - sum(out)))
    assert all(n % (2 * P) == 0 for n in out), out
    return out


def analytic_bytes(method: str, total: int) -> int:
    e = total // P * H * D * BYTES
    if method in ("ulysses", "deepspeed"):
        return 8 * e * (P - 1) // P
    if method.startswith("ring"):
        return (3 * P - 2) * 2 * e
    if method == "allgather":
        return 4 * (P - 1) * e
    u = r = 2
    return 8 * e * (u - 1) // u + (3 * r - 2) * 2 * e


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class _Wrapped:
    """Wrap torch.distributed collectives: per-op logical bytes sent and seconds."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.saved, self.stats = dist, {}, {}

    def _add(self, op, nbytes, seconds):
        s = self.stats.setdefault(op, {"calls": 0, "bytes": 0, "seconds": 0.0})
        s["calls"] += 1
        s["bytes"] += int(nbytes)
        s["seconds"] += seconds

    def __enter__(self):
        dist = self.dist
        for name in ("all_to_all_single", "all_gather_single", "batch_isend_irecv"):
            self.saved[name] = getattr(dist, name)

        def a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            world = dist.get_world_size(group)
            t0 = time.perf_counter()
            work = self.saved["all_to_all_single"](output, input, output_split_sizes, input_split_sizes,
                                                   group=group, async_op=async_op)
            self._add("all_to_all_single", input.numel() * input.element_size() * (world - 1) // world,
                      time.perf_counter() - t0)
            return work

        def agather(output, input, group=None, async_op=False):
            t0 = time.perf_counter()
            work = self.saved["all_gather_single"](output, input, group=group, async_op=async_op)
            self._add("all_gather_single", input.numel() * input.element_size() * (dist.get_world_size(group) - 1),
                      time.perf_counter() - t0)
            return work

        def p2p(ops):
            sent = sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is self.dist.isend)
            t0 = time.perf_counter()
            works = self.saved["batch_isend_irecv"](ops)
            self._add("p2p", sent, time.perf_counter() - t0)
            return [_TimedWork(w, self) for w in works]

        dist.all_to_all_single, dist.all_gather_single, dist.batch_isend_irecv = a2a, agather, p2p
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)


class _TimedWork:
    def __init__(self, work, wrapped):
        self.work, self.wrapped = work, wrapped

    def wait(self):
        t0 = time.perf_counter()
        out = self.work.wait()
        self.wrapped._add("p2p", 0, time.perf_counter() - t0)  # time only; bytes counted at send
        return out


def _make_fn(method, plan, rank, cu, max_len):
    """The method as ``fn(q, k, v) -> out`` on local ``[T/P, H, D]`` shards."""
    import torch.distributed as dist

    from seqshard.kernels.attention import attention

    group = dist.group.WORLD
    if method == "ulysses":
        from seqshard.parallel.ulysses import ulysses_attention
        return lambda q, k, v: ulysses_attention(q, k, v, plan, group, causal=True)
    if method.startswith("ring"):
        from seqshard.parallel.ring import ring_attention
        return lambda q, k, v: ring_attention(q, k, v, plan, group, causal=True)
    if method == "allgather":
        from seqshard.parallel.allgather import allgather_attention
        return lambda q, k, v: allgather_attention(q, k, v, plan, group, causal=True)
    if method == "usp_2x2":
        from torch.distributed.device_mesh import init_device_mesh

        from seqshard.parallel.usp import usp_attention
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
        groups = (mesh["ulysses"].get_group(), mesh["ring"].get_group())
        return lambda q, k, v: usp_attention(q, k, v, plan, groups, causal=True)
    assert method == "deepspeed", method
    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed.comm as ds_dist
    from deepspeed.sequence.layer import DistributedAttention

    ds_dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)

    def local_attn(q, k, v):  # [T, 1, H/P, D]: the whole stream in order (stream layout)
        out = attention(q[:, 0], k[:, 0], v[:, 0], cu, cu, max_len, max_len, causal=True)
        return out.unsqueeze(1)

    # [s, b, h, d] layout (batch_dim_idx 1): scatter heads (2), gather sequence (0)
    layer = DistributedAttention(local_attn, group, scatter_idx=2, gather_idx=0)
    return lambda q, k, v: layer(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), 1)[:, 0]


def _inputs(lengths):
    import torch

    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v, dout = (torch.randn(total, H, D, generator=gen) for _ in range(4))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, dout, cu


def _step(fn, tensors, dout):
    for t in tensors:
        t.grad = None
    fn(*tensors).backward(dout)


def rank_bench(rank, world, method, lengths, reps):
    """One method on this rank: peak-memory delta of the warm-up step, then timed reps."""
    import torch.distributed as dist

    from seqshard.dist.comm_stats import COMM_LOG
    from seqshard.kernels.attention import attention
    from seqshard.parallel.plan import ShardPlan

    q, k, v, dout, cu = _inputs(lengths)
    max_len = max(lengths)
    if world == 1:
        tensors, dout_l = [t.clone().requires_grad_() for t in (q, k, v)], dout
        fn = lambda q, k, v: attention(q, k, v, cu, cu, max_len, max_len, causal=True)  # noqa: E731
    else:
        plan = ShardPlan.build(cu.tolist(), world, LAYOUT[method])
        tensors = [plan.shard(t, rank).requires_grad_() for t in (q, k, v)]
        dout_l = plan.shard(dout, rank)
        fn = _make_fn(method, plan, rank, cu, max_len)
    del q, k, v, dout
    rss0 = _rss_bytes()
    _step(fn, tensors, dout_l)
    peak = _maxrss_bytes() - rss0
    COMM_LOG.reset()
    times = []
    with _Wrapped() as wrapped:
        for _ in range(reps):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            _step(fn, tensors, dout_l)
            times.append(time.perf_counter() - t0)
    return {"times": times, "peak_bytes": peak, "comm_log": COMM_LOG.snapshot(), "wrapped": wrapped.stats}


def summarize(method, total, per_rank, reps):
    """Per-rank results -> one row (comm/bytes: mean over ranks, per rep)."""
    wall = statistics.median(max(r["times"][i] for r in per_rank) for i in range(reps))
    n = len(per_rank)
    log_s = sum(r["comm_log"]["total"]["seconds"] for r in per_rank) / n / reps
    log_b = sum(r["comm_log"]["total"]["bytes"] for r in per_rank) / n / reps
    wr_s = sum(s["seconds"] for r in per_rank for s in r["wrapped"].values()) / n / reps
    wr_b = sum(s["bytes"] for r in per_rank for s in r["wrapped"].values()) / n / reps
    a2a_s = sum(r["wrapped"].get("all_to_all_single", {}).get("seconds", 0.0) for r in per_rank) / n / reps
    row = {"method": method, "T": total, "layout": LAYOUT.get(method, "-"), "wall_s": wall,
           "comm_log_s": log_s if method != "deepspeed" else None,
           "comm_log_bytes": log_b if method != "deepspeed" else None,
           "wrapped_s": wr_s, "wrapped_a2a_s": a2a_s, "wrapped_bytes": wr_b,
           "peak_mib_max_rank": max(r["peak_bytes"] for r in per_rank) / 2**20,
           "per_rank": per_rank}
    if method != "single":
        row["analytic_bytes"] = analytic_bytes(method, total)
        row["bytes_ratio"] = wr_b / row["analytic_bytes"]
    return row


def zigzag_balance(lengths):
    from seqshard.parallel.plan import ShardPlan

    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    out = {}
    for layout in ("zigzag", "contiguous"):
        plan = ShardPlan.build(cu, P, layout)
        work = [plan.causal_work(r) for r in range(P)]
        out[layout] = max(work) / (sum(work) / P)
    return out


def goals(rows, balance):
    res = {}
    for total in sorted({r["T"] for r in rows}):
        by = {r["method"]: r for r in rows if r["T"] == total}
        u, ds = by["ulysses"]["wrapped_a2a_s"], by["deepspeed"]["wrapped_a2a_s"]
        ratios = {m: by[m]["bytes_ratio"] for m in METHODS}
        single = by["single"]["peak_mib_max_rank"]
        mem = {m: by[m]["peak_mib_max_rank"] / single for m in METHODS}
        res[str(total)] = {
            "ulysses_comm_vs_deepspeed": {"value": u / ds, "goal": "<= 0.75", "met": u / ds <= 0.75},
            "bytes_vs_analytic": {"value": ratios, "goal": "<= 1.05", "met": all(x <= 1.05 for x in ratios.values())},
            "zigzag_max_over_mean_work": {"value": balance[str(total)]["zigzag"], "goal": "<= 1.05",
                                          "met": balance[str(total)]["zigzag"] <= 1.05},
            "peak_mem_p4_vs_p1": {"value": mem, "goal": "<= 0.30",
                                  "met": {m: x <= 0.30 for m, x in mem.items()}}}
    return res


def print_table(rows):
    head = f"{'T':>6} {'method':<16} {'wall s':>8} {'comm s':>8} {'a2a s':>8} {'MiB/rank':>9} {'bytes/min':>9} {'peak MiB':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        comm = r["comm_log_s"] if r["comm_log_s"] is not None else r["wrapped_s"]
        ratio = f"{r['bytes_ratio']:.3f}" if "bytes_ratio" in r else "-"
        print(f"{r['T']:>6} {r['method']:<16} {r['wall_s']:>8.2f} {comm:>8.3f} {r['wrapped_a2a_s']:>8.3f} "
              f"{r['wrapped_bytes'] / 2**20:>9.1f} {ratio:>9} {r['peak_mib_max_rank']:>9.0f}")


def machine():
    import deepspeed
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "mem_gib": round(mem, 1), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version(),
            "backend": "gloo, 4 spawned ranks on one host, 1 torch thread per rank"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="T = 16K, 64K with documents <= 8K (default: quick)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seqlens", type=int, nargs="*", help="override T values")
    ap.add_argument("--max-doc", type=int, help="override the longest document")
    args = ap.parse_args()
    seqlens = args.seqlens or ([16384, 65536] if args.full else [4096, 16384])
    max_doc = args.max_doc or (8192 if args.full else 2048)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows, balance, docs = [], {}, {}
    for total in seqlens:
        lengths = doc_lengths(total, min(max_doc, total))
        docs[str(total)] = lengths
        balance[str(total)] = zigzag_balance(lengths)
        single = run_ranks(1, rank_bench, "single", lengths, args.reps, timeout=1800)
        rows.append(summarize("single", total, single, args.reps))
        print(f"T={total} single: {rows[-1]['wall_s']:.2f}s", flush=True)
        for method in METHODS:
            per_rank = run_ranks(P, rank_bench, method, lengths, args.reps, timeout=1800)
            rows.append(summarize(method, total, per_rank, args.reps))
            print(f"T={total} {method}: {rows[-1]['wall_s']:.2f}s", flush=True)
    print_table(rows)
    result = {"machine": machine(), "config": {"P": P, "heads": H, "head_dim": D, "dtype": "fp32", "causal": True,
                                               "reps": args.reps, "seqlens": seqlens, "doc_lengths": docs},
              "measured_how": __doc__, "rows": rows, "zigzag_balance": balance, "goals": goals(rows, balance)}
    print(json.dumps(result["goals"], indent=1))
    out = ROOT / "bench" / "results" / "sp_attention.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
