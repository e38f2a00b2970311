"""Ulysses communication alone: seqshard's exchange vs DeepSpeed's, side by side (issue #4).

``bench/sp_attention.py`` times the all-to-alls inside a full attention step, where on a shared
CPU most of a collective's time is waiting for the slowest rank to finish its attention. This
script removes the attention: each rank holds ``[T/P, H, D]`` q, k, v (fp32, H = 8, D = 64),
the "attention" is ``q + k + v`` on the head-split tensors, and one rep is forward + backward:

- seqshard: ``ulysses.scatter_heads`` (q, k and v in ONE all-to-all; they come out as views of
  the received buffer, so the ``q + k + v`` reads them strided) and ``gather_heads``;
  backward: one all-to-all of the output gradient, one of dq/dk/dv together.
- deepspeed: ``deepspeed.sequence.layer.DistributedAttention`` (0.19: one all-to-all per tensor,
  q, k, v and the output; the same again in backward) around the same ``q + k + v``.

Both move the same bytes. The ranks meet at a barrier before every rep; a rep's time is the
max over ranks; the two methods alternate rep by rep (so drift of the shared machine hits both)
and the table shows the median over ``--reps``. 4 gloo ranks, 1 torch thread each.

    python bench/ulysses_comm.py                    # T = 4K, 16K, 64K, 256K tokens
    python bench/ulysses_comm.py --seqlens 16384 --reps 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.ranks import run_ranks  # noqa: E402

P, H, D = 4, 8, 64
METHODS = ("seqshard", "deepspeed")


def _add3(q, k, v):
    return q + k + v  # the same two adds DeepSpeed's side does (``sum`` would add a third)


def rank_bench(rank, world, seqlens, reps, warmup):
    import torch
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed.comm as ds_dist
    from deepspeed.sequence.layer import DistributedAttention

    from seqshard.parallel.ulysses import gather_heads, scatter_heads

    ds_dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    group = dist.group.WORLD
    layer = DistributedAttention(lambda q, k, v, *a, **kw: q + k + v, group, scatter_idx=2, gather_idx=0)
    fns = {
        "seqshard": lambda q, k, v: gather_heads(_add3(*scatter_heads(q, k, v, group)), group),
        # [s, b, h, d] with batch_dim_idx 1: scatter heads (2), gather sequence (0)
        "deepspeed": lambda q, k, v: layer(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), 1)[:, 0],
    }
    out = {}
    for total in seqlens:
        gen = torch.Generator().manual_seed(rank)
        q, k, v, dout = (torch.randn(total // world, H, D, generator=gen) for _ in range(4))
        tensors = [t.requires_grad_() for t in (q, k, v)]
        results = {}
        for name, fn in fns.items():  # same values from both (checked once, outside the timing)
            for t in tensors:
                t.grad = None
            o = fn(*tensors)
            o.backward(dout)
            results[name] = [o.detach()] + [t.grad.clone() for t in tensors]
        for a, b in zip(results["seqshard"], results["deepspeed"]):
            torch.testing.assert_close(a, b)
        times = {m: [] for m in METHODS}
        for i in range(warmup + reps):
            for name in (METHODS if i % 2 == 0 else METHODS[::-1]):
                for t in tensors:
                    t.grad = None
                dist.barrier()
                t0 = time.perf_counter()
                fns[name](*tensors).backward(dout)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        out[total] = times
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="*", default=[4096, 16384, 65536, 262144])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ulysses_comm.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    per_rank = run_ranks(P, rank_bench, args.seqlens, args.reps, args.warmup)
    rows = []
    for total in args.seqlens:
        med = {m: statistics.median(max(r[total][m][i] for r in per_rank) for i in range(args.reps))
               for m in METHODS}
        mib = 8 * (total // P) * H * D * 4 * (P - 1) / P / 2**20  # q, k, v, o and their grads
        rows.append({"T": total, "seqshard_ms": med["seqshard"] * 1e3, "deepspeed_ms": med["deepspeed"] * 1e3,
                     "ratio": med["seqshard"] / med["deepspeed"], "mib_sent_per_rank": mib,
                     "per_rank_s": [{m: r[total][m] for m in METHODS} for r in per_rank]})
    print(f"{'T':>7} {'MiB/rank':>9} {'seqshard ms':>12} {'deepspeed ms':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['T']:>7} {r['mib_sent_per_rank']:>9.1f} {r['seqshard_ms']:>12.1f} {r['deepspeed_ms']:>13.1f} "
              f"{r['ratio']:>6.2f}")
    goal = {str(r["T"]): {"value": r["ratio"], "goal": "<= 0.75", "met": r["ratio"] <= 0.75} for r in rows}
    for t, g in goal.items():
        print(f"goal T={t}: seqshard / deepspeed communication time {g['value']:.2f} "
              f"({'MET' if g['met'] else 'NOT MET'}, goal <= 0.75)")
    import deepspeed
    import torch

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "measured_how": __doc__, "config": {"P": P, "heads": H, "head_dim": D, "dtype": "fp32",
                                            "reps": args.reps, "warmup": args.warmup},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__, "python": platform.python_version()},
        "rows": rows, "goal_ulysses_comm_vs_deepspeed": goal}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
