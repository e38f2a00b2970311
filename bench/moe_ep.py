"""Expert parallelism (``parallel.ep``): one MoE layer's fwd + bwd at ep 1 and ep P on gloo ranks.

Per config (Mixtral-shaped: 8 experts, top-2) every rank owns ``--tokens`` tokens and, at ep P,
``E/P`` experts (parallel/ep.py: counts exchange, uneven all-to-all dispatch, local grouped
matmuls, combine). Reported per rank: median fwd + bwd time over ``--reps`` after ``--warmup``;
bytes sent by ``moe.dispatch`` and ``moe.combine`` in the forward (and their ``.bwd`` twins);
and the expected bytes under the measured routing: the rows whose expert lives on another rank,
``x D x 4`` bytes, once each way. ep 1 is one process on the same tokens per rank (no exchange).
Times on shared CPU cores are rough. Output: a table and ``bench/results/moe_ep.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]

CONFIGS = {"mixtral-like": dict(dim=512, ffn=1024, experts=8, top_k=2)}


def layer(c):
    from seqshard.models.config import ModelConfig, MoEConfig
    from seqshard.models.moe import MoE

    torch.manual_seed(0)
    m = MoE(ModelConfig(dim=c["dim"], ffn_dim=c["ffn"], moe=MoEConfig(num_experts=c["experts"], top_k=c["top_k"])))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m


def run(rank, world, init_file, c, tokens, reps, warmup, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from seqshard.dist.comm_stats import COMM_LOG

    m = layer(c)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from seqshard.dist.mesh import build_expert_mesh
        from seqshard.parallel.ep import shard_experts

        shard_experts(m, build_expert_mesh(init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)), world))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, c["dim"], generator=gen)
    grad = torch.randn(tokens, c["dim"], generator=gen)
    with torch.no_grad():
        top_i = m.router(x)[2]
    local = c["experts"] // world
    remote_rows = int((top_i // local != rank).sum()) if world > 1 else 0
    secs = []
    for i in range(warmup + reps):
        COMM_LOG.reset()
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        xi = x.clone().requires_grad_()
        m(xi).backward(grad)
        if i >= warmup:
            secs.append(time.perf_counter() - start)
    comm = COMM_LOG.snapshot()
    queue.put((rank, statistics.median(secs), {op: v["bytes"] for op, v in comm.items() if op.startswith("moe.")},
               remote_rows * c["dim"] * 4))
    if world > 1:
        dist.destroy_process_group()


def measure(world, c, tokens, reps, warmup):
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=run, args=(r, world, f"{tmp}/rdv", c, tokens, reps, warmup, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        out = sorted(queue.get() for _ in procs)
        for p in procs:
            p.join()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_ep.json"))
    args = ap.parse_args(argv)
    rows = []
    print(f"{'config':13} {'tokens/rank':>11} {'ep':>3} {'fwd+bwd ms':>11} {'dispatch B/rank':>16} "
          f"{'combine B/rank':>15} {'expected B':>11}")
    for name, c in CONFIGS.items():
        for t in args.tokens:
            for ep in [1] + args.ep:
                res = measure(ep, c, t, args.reps, args.warmup)
                ms = max(r[1] for r in res) * 1e3  # the slowest rank
                dispatch = max(r[2].get("moe.dispatch", 0) for r in res)
                combine = max(r[2].get("moe.combine", 0) for r in res)
                expected = max(r[3] for r in res)
                rows.append({"config": name, "tokens_per_rank": t, "ep": ep, "fwd_bwd_ms": ms,
                             "per_rank": [{"rank": r[0], "ms": r[1] * 1e3, "bytes": r[2], "expected_bytes": r[3]}
                                          for r in res]})
                print(f"{name:13} {t:>11} {ep:>3} {ms:>11.1f} {dispatch:>16} {combine:>15} {expected:>11}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
