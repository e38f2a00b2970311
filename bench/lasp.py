"""LASP-2 vs LASP-1 on 4 gloo ranks: time, communication time and bytes per rank (issue #5).

Part 1, one linear-attention layer: fwd+bwd of ``lasp{1,2}_attention`` (H = 4 heads, head dim
64 for q/k/v, data-dependent decay ``g = logsigmoid(randn)``, fp32) on shards of
``ShardPlan.build(cu, 4, "stream")`` for T in ``--lengths`` tokens, two document mixes:
``single`` (one document spanning all ranks) and ``packed`` (4 documents of 3/8, 1/8, 2/8, 2/8 T).
Part 2, a hybrid block stack (``arch="hybrid"``, ``layer_pattern="LLLA"``, dim 256, 4 heads,
data decay) under ``parallelize`` with ``sp_method`` lasp2 / lasp1 and softmax layers by
all-gather (ring is not supported on LASP's ``stream`` layout: ring balances causal work only
on zigzag, and one step has one layout), the shard and SPContext built by ``make_sharder`` on
``init_device_mesh("cpu", (1, 4), ("dp", "sp"))``; fwd + loss + bwd per step.

Everything runs in one spawn of 4 ranks (``tests.helpers.ranks.run_ranks``, file:// rendezvous,
1 thread per rank). Per case: ``--warmup`` untimed reps, then ``--reps`` timed reps, each between
barriers; a rep's wall time is the max over ranks, reported as the median over reps. Comm
seconds / bytes are ``COMM_LOG`` totals per rank per rep (synchronous collective time, which
includes waiting on slower peers; LASP-1's p2p waits include the serial chain), max over ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seqshard.dist.comm_stats import COMM_LOG  # noqa: E402
from seqshard.parallel.lasp1 import lasp1_attention  # noqa: E402
from seqshard.parallel.lasp2 import lasp2_attention  # noqa: E402
from seqshard.parallel.plan import ShardPlan  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402

WORLD, HEADS, HEAD_DIM = 4, 4, 64
METHODS = {"lasp2": lasp2_attention, "lasp1": lasp1_attention}
PACKED = (3, 1, 2, 2)  # eighths of T


def doc_lengths(t: int, mix: str) -> list[int]:
    if mix == "single":
        return [t]
    return [t * e // 8 for e in PACKED]


def timed(step, group, warmup, reps):
    """Run ``step`` warmup+reps times between barriers; per-rep seconds and COMM_LOG totals."""
    for _ in range(warmup):
        step()
    secs, comm_s, comm_b = [], [], []
    for _ in range(reps):
        dist.barrier(group)
        COMM_LOG.reset()
        start = time.perf_counter()
        step()
        secs.append(time.perf_counter() - start)
        tot = COMM_LOG.snapshot()["total"]
        comm_s.append(tot["seconds"])
        comm_b.append(tot["bytes"])
    return {"secs": secs, "comm_s": comm_s, "comm_bytes": comm_b}


def layer_case(rank, t, mix, method, warmup, reps):
    lengths = doc_lengths(t, mix)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    plan = ShardPlan.build(cu, WORLD, "stream")
    n = len(plan.index[rank])
    gen = torch.Generator().manual_seed(rank)
    q, k, v, dout = (torch.randn(n, HEADS, HEAD_DIM, generator=gen) for _ in range(4))
    g = (torch.nn.functional.logsigmoid(torch.randn(n, HEADS, generator=gen)) / 8)
    leaves = [x.requires_grad_() for x in (q, k, v, g)]
    fn = METHODS[method]

    def step():
        for x in leaves:
            x.grad = None
        fn(*leaves, plan, dist.group.WORLD).backward(dout)

    return timed(step, dist.group.WORLD, warmup, reps)


def hybrid_case(rank, t, method, warmup, reps):
    from types import SimpleNamespace

    from torch.distributed.device_mesh import init_device_mesh

    from seqshard.models import build_model
    from seqshard.models.config import LinearAttnConfig, ModelConfig
    from seqshard.parallel.parallelize import make_sharder, parallelize

    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "sp"))
    cfg = SimpleNamespace(sp=WORLD, sp_method=method, layout="auto", softmax_method="allgather")
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="hybrid", dim=256, n_layers=4, n_heads=4, n_kv_heads=4,
                                    ffn_dim=512, layer_pattern="LLLA",
                                    linear_attn=LinearAttnConfig(decay="data")))
    parallelize(model, mesh, cfg)
    lengths = doc_lengths(t, "packed")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 259, (t,), generator=gen)
    labels = torch.roll(tokens, -1)
    positions = torch.cat([torch.arange(n) for n in lengths])
    tok, lab, pos, ctx = make_sharder(mesh, cfg, pad_id=0)(tokens, labels, positions, lengths)

    def step():
        model.zero_grad(set_to_none=True)
        model(tok, pos, ctx, labels=lab).backward()

    return timed(step, mesh["sp"].get_group(), warmup, reps)


def rank_main(rank, world, cases, warmup, reps):
    torch.manual_seed(rank)
    out = []
    for i, case in enumerate(cases):
        start = time.perf_counter()
        if case[0] == "layer":
            out.append(layer_case(rank, case[1], case[2], case[3], warmup, reps))
        else:
            out.append(hybrid_case(rank, case[1], case[3], warmup, reps))
        if rank == 0:  # progress on rank 0 only
            print(f"[{i + 1}/{len(cases)}] {' '.join(map(str, case))}: {time.perf_counter() - start:.0f}s",
                  file=sys.stderr, flush=True)
    return out


def summarize(per_rank):
    """Max over ranks per rep, median over reps."""
    reps = len(per_rank[0]["secs"])
    med = lambda key: statistics.median(max(r[key][i] for r in per_rank) for i in range(reps))  # noqa: E731
    return {"wall_s": med("secs"), "comm_s": med("comm_s"), "bytes_per_rank": med("comm_bytes"),
            "wall_s_per_rank_median": [statistics.median(r["secs"]) for r in per_rank]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--hybrid-lengths", default="4096,8192")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8K and 16K only, 2 reps")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lasp.json"))
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.hybrid_lengths, args.reps = "8192,16384", "4096", 2
    lengths = [int(x) for x in args.lengths.split(",")]
    hlengths = [int(x) for x in args.hybrid_lengths.split(",") if x]
    cases = [("layer", t, mix, m) for mix in ("single", "packed") for t in lengths for m in METHODS]
    cases += [("hybrid", t, "packed", m) for t in hlengths for m in METHODS]
    start = time.perf_counter()
    results = run_ranks(WORLD, rank_main, cases, args.warmup, args.reps, timeout=3000)
    total = time.perf_counter() - start
    rows = []
    for i, (part, t, mix, m) in enumerate(cases):
        rows.append({"part": part, "T": t, "mix": mix, "method": m, **summarize([r[i] for r in results])})
    print_table(rows)
    goals = check_goals(rows, lengths)
    for name, g in goals.items():
        print(f"goal {name}: {'MET' if g['met'] else 'NOT MET'} ({g['detail']})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine(), "method": __doc__, "args": vars(args), "total_run_s": total,
                   "rows": rows, "goals": goals}, f, indent=1)
    print(f"wrote {args.out} ({total:.0f}s)")


def find(rows, part, t, mix, m):
    return next(r for r in rows if (r["part"], r["T"], r["mix"], r["method"]) == (part, t, mix, m))


def print_table(rows):
    print(f"{'part':6} {'mix':6} {'T':>7} {'method':6} {'wall ms':>9} {'comm ms':>9} {'KiB/rank':>9} "
          f"{'l1/l2':>6}")
    for r in rows:
        other = find(rows, r["part"], r["T"], r["mix"], "lasp1")
        speed = f"{other['wall_s'] / r['wall_s']:.2f}" if r["method"] == "lasp2" else ""
        print(f"{r['part']:6} {r['mix']:6} {r['T']:>7} {r['method']:6} {r['wall_s'] * 1e3:9.1f} "
              f"{r['comm_s'] * 1e3:9.1f} {r['bytes_per_rank'] / 1024:9.1f} {speed:>6}")


def check_goals(rows, lengths):
    tmax = max(lengths)
    goals = {}
    for mix in ("single", "packed"):
        s = find(rows, "layer", tmax, mix, "lasp1")["wall_s"] / find(rows, "layer", tmax, mix, "lasp2")["wall_s"]
        goals[f"lasp2_1.15x_faster_T{tmax}_{mix}"] = {
            "met": s >= 1.15, "speedup": s, "detail": f"LASP-1/LASP-2 wall = {s:.2f}x at T={tmax}"}
        b = [find(rows, "layer", t, mix, "lasp2")["bytes_per_rank"] for t in lengths]
        goals[f"lasp2_bytes_flat_{mix}"] = {"met": len(set(b)) == 1, "bytes": b,
                                            "detail": f"bytes/rank over T = {sorted(set(b))}"}
    return goals


def machine():
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "ranks": WORLD, "backend": "gloo", "threads_per_rank": 1,
            "note": "2 CPU cores shared with other workers; timings are noisy"}


if __name__ == "__main__":
    main()
