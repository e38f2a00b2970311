"""Attention memory and time on CPU: one causal document, forward + backward.

Variants, each run in a fresh process (peak RSS over the process's baseline after the inputs
exist, from ``getrusage``):
- ``reference``: the dense torch reference (``SEQSHARD_KERNELS=reference``: ``[H, L, L]`` fp32
  scores kept for backward), only where one score matrix is <= 1.1 GB (it needs ~5x that);
- ``flash_cpu``: seqshard's default CPU path, ``seqshard.kernels.attention`` on packed ``[L, H, D]``
  (PyTorch's CPU flash kernel per document);
- ``blockwise``: the plain-torch fallback for non-CPU devices without Triton
  (``SEQSHARD_KERNELS=blockwise``), run here on CPU to compare with ``flash_cpu``, L <= 8K by
  default (``--blockwise-max-l``: it is ~10x slower than flash_cpu on CPU);
- ``sdpa``: the peer, ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on ``[1, H, L, D]``.
Shapes: 4 heads x 32 (the tiny model) and 8 heads x 64, fp32, L in 4K..32K.

    PYTHONPATH=. python bench/attention_memory.py            # table + bench/results/attention_memory.json
    PYTHONPATH=. python bench/attention_memory.py --lengths 4096 8192   # a subset
    PYTHONPATH=. python bench/attention_memory.py --blockwise-max-l 16384   # the committed JSON
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [(4, 32), (8, 64)]
LENGTHS = [4096, 8192, 16384, 32768]
REFERENCE_MAX_SCORE_BYTES = 1.1e9
OUT = Path(__file__).parent / "results" / "attention_memory.json"


def child(variant: str, length: int, heads: int, dim: int) -> dict:
    import torch
    import torch.nn.functional as F

    from seqshard.kernels.attention import attention

    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(length, heads, dim) for _ in range(4))
    cu = torch.tensor([0, length], dtype=torch.int32)
    if variant == "sdpa":  # [L, H, D] -> [1, H, L, D]
        q, k, v, dout = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v, dout))
        run = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    else:
        run = lambda q, k, v: attention(q, k, v, cu, cu, length, length, causal=True)  # noqa: E731
    for t in (q, k, v):
        t.requires_grad_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = run(q, k, v)
    t1 = time.perf_counter()
    out.backward(dout)
    t2 = time.perf_counter()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "L": length, "heads": heads, "head_dim": dim, "fwd_s": t1 - t0, "bwd_s": t2 - t1,
            "fwd_bwd_s": t2 - t0, "peak_rss_increase_mb": (after - before) / 1024, "baseline_rss_mb": before / 1024}


def measure(variant: str, length: int, heads: int, dim: int) -> dict:
    env = {**os.environ, "SEQSHARD_KERNELS": variant if variant in ("reference", "blockwise") else "auto",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, __file__, "--child", variant, str(length), str(heads), str(dim)],
                         env=env, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        return {"variant": variant, "L": length, "heads": heads, "head_dim": dim, "error": run.stderr[-500:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--blockwise-max-l", type=int, default=8192)
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        variant, *nums = args.child
        print(json.dumps(child(variant, *map(int, nums))))
        return
    rows = []
    print(f"{'H x D':>7} {'L':>6} {'variant':>10} {'fwd s':>7} {'bwd s':>7} {'fwd+bwd s':>9} {'peak +MB':>9}")
    for heads, dim in SHAPES:
        for length in args.lengths:
            for variant in ("reference", "flash_cpu", "blockwise", "sdpa"):
                if variant == "blockwise" and length > args.blockwise_max_l:
                    continue
                if variant == "reference" and heads * length * length * 4 > REFERENCE_MAX_SCORE_BYTES:
                    row = {"variant": variant, "L": length, "heads": heads, "head_dim": dim,
                           "skipped": f"one [H, L, L] fp32 score matrix is {heads * length ** 2 * 4 / 1e9:.1f} GB"}
                    print(f"{heads:>3} x {dim:<3} {length:>6} {variant:>10}   skipped ({row['skipped']})")
                else:
                    row = measure(variant, length, heads, dim)
                    if "error" in row:
                        print(f"{heads:>3} x {dim:<3} {length:>6} {variant:>10}   failed: {row['error'][-120:]}")
                    else:
                        print(f"{heads:>3} x {dim:<3} {length:>6} {variant:>10} {row['fwd_s']:>7.2f} "
                              f"{row['bwd_s']:>7.2f} {row['fwd_bwd_s']:>9.2f} {row['peak_rss_increase_mb']:>9.0f}",
                              flush=True)
                rows.append(row)
                save(rows)  # after every row: a run stopped half-way keeps what it measured
    print(f"wrote {OUT}")


def save(rows: list) -> None:
    OUT.parent.mkdir(exist_ok=True)
    meta = {"cpu_threads": os.cpu_count(), "note": "2-core machine shared with other jobs: timings under contention",
            "dtype": "float32", "causal": True}
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
