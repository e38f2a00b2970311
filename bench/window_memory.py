"""Sliding-window attention at long context (issue #29): peak memory per rank, time and bytes
of one document under the window-aware Ring on gloo ranks, fwd + bwd, against its length.

One causal attention layer with window W (``window_size=(W - 1, 0)``), fp32, H = 4 heads
(2 kv heads), head_dim 32, one document of L tokens, ``ring_attention`` (zigzag layout: the
window-aware exchange of ``parallel/ring_window.py``) on P spawned gloo ranks (1 thread each),
plus the same layer in one process (``seqshard.kernels.attention``: the blockwise path, which
skips key blocks outside the window). Each (L, variant) runs in fresh processes.

Measured per rank: ``ru_maxrss`` increase over the RSS once the inputs exist (peak_mb), fwd+bwd
seconds, K/V bytes sent in the forward and dK/dV bytes in the backward (``COMM_LOG``), and the
analytic minimum of the forward (the keys inside other ranks' windows, counted from the plan).
Linear memory means peak_mb / L stays flat as L doubles; a full ``[H, L, L]`` score matrix at
64K would be 64 GiB.

    PYTHONPATH=. python bench/window_memory.py                # L = 8K..64K, W = 1K, P = 2
    PYTHONPATH=. python bench/window_memory.py --lengths 8192 16384
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.ranks import run_ranks  # noqa: E402

OUT = Path(__file__).parent / "results" / "window_memory.json"
HEADS, KV_HEADS, DIM = 4, 2, 32


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def rank_run(rank, world, length, window, variant):
    import torch
    import torch.distributed as dist

    from seqshard.dist.comm_stats import COMM_LOG
    from seqshard.kernels.attention import attention
    from seqshard.kernels.attention.masks import make_mask
    from seqshard.parallel.plan import ShardPlan
    from seqshard.parallel.ring import ring_attention
    from seqshard.parallel.ring_window import window_bytes_minimum

    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, length], dtype=torch.int32)
    plan = ShardPlan.build(cu.tolist(), world, "zigzag")
    n = plan.local_len if variant == "ring" else length
    q = torch.randn(n, HEADS, DIM, generator=gen).requires_grad_()
    k = torch.randn(n, KV_HEADS, DIM, generator=gen).requires_grad_()
    v = torch.randn(n, KV_HEADS, DIM, generator=gen).requires_grad_()
    dout = torch.randn(n, HEADS, DIM, generator=gen)
    pattern = dict(window_size=(window - 1, 0))
    base = _rss_mb()
    COMM_LOG.reset()
    t0 = time.perf_counter()
    if variant == "ring":
        out = ring_attention(q, k, v, plan, dist.group.WORLD, causal=True, **pattern)
    else:
        out = attention(q, k, v, cu, cu, length, length, causal=True, **pattern)
    out.backward(dout)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    comm = COMM_LOG.snapshot()
    kv_bytes = comm.get("ring_window.kv", {"bytes": 0})["bytes"]
    minimum = window_bytes_minimum(plan, rank, make_mask(True, (window - 1, 0)), 2 * KV_HEADS * DIM * 4) \
        if variant == "ring" else 0
    return {"variant": variant, "L": length, "W": window, "P": world if variant == "ring" else 1, "rank": rank,
            "fwd_bwd_s": seconds, "peak_mb": peak - base, "kv_bytes_fwd": kv_bytes,
            "dkv_bytes_bwd": comm.get("ring_window.dkv", {"bytes": 0})["bytes"], "kv_bytes_min": minimum}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["ring", "single"])
    args = ap.parse_args()
    rows = []
    print(f"{'variant':>7} {'L':>6} {'P':>2} {'peak MB/rank':>12} {'MB per 1K tok':>13} {'fwd+bwd s':>9} "
          f"{'kv bytes':>9} {'min':>9}")
    for variant in args.variants:
        for length in args.lengths:
            world = args.ranks if variant == "ring" else 1
            per_rank = run_ranks(world, rank_run, length, args.window, variant, timeout=3600)
            worst = max(per_rank, key=lambda r: r["peak_mb"])
            rows += per_rank
            print(f"{variant:>7} {length:>6} {world:>2} {worst['peak_mb']:>12.1f} "
                  f"{worst['peak_mb'] / (length / 1024):>13.2f} {max(r['fwd_bwd_s'] for r in per_rank):>9.1f} "
                  f"{max(r['kv_bytes_fwd'] for r in per_rank):>9} {max(r['kv_bytes_min'] for r in per_rank):>9}",
                  flush=True)
    OUT.write_text(json.dumps({"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "rows": rows}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
