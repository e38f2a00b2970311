"""Tiled MLP backward: one gradient buffer for all tiles vs a slice per tile (issue #32).

``train.mlp_tiles: 0`` runs each SwiGLU MLP over ``ceil(T / dim)`` checkpointed sequence tiles.
Taken as plain slices of the input, every tile's backward (``SliceBackward``) zero-fills a
gradient of the whole ``[T, dim]`` input and autograd adds it into the accumulated one: ``T / dim``
full-size fills and adds per layer, O(T^2 / dim) bytes moved. ``seqshard.train.memory`` now takes
the tiles with ``Tensor.split``, whose one backward node concatenates the tile gradients once.

Each (T, variant) runs in its own process (one torch thread, ``MALLOC_MMAP_THRESHOLD_=1048576``
so freed tensors leave the RSS): forward + backward of the tiny model's MLP (dim 256, SwiGLU 688,
fp32) on ``[T, 256]`` with ``T / 256`` tiles, best of ``--reps``; peak = the process's max RSS.
``slices`` is the previous code (``x.tensor_split`` views into ``torch.utils.checkpoint``).

  python bench/tiled_mlp.py                        # T = 8K, 32K, 128K
Writes bench/results/tiled_mlp.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DIM, FFN = 256, 688


def worker(T: int, variant: str, reps: int) -> dict:
    import torch
    from torch.utils.checkpoint import checkpoint

    from seqshard.models.llama import SwiGLU
    from seqshard.train.memory import tiled_mlp_forward

    torch.manual_seed(0)
    mlp = SwiGLU(DIM, FFN)
    x = torch.randn(T, DIM, requires_grad=True)
    n = T // DIM

    def run():
        if variant == "slices":
            return torch.cat([checkpoint(mlp, t, use_reentrant=False) for t in x.tensor_split(n)], dim=0)
        return tiled_mlp_forward(mlp, x, 0)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(reps):
        x.grad = None
        t0 = time.perf_counter()
        run().square().sum().backward()
        times.append(time.perf_counter() - t0)
    return {"T": T, "variant": variant, "tiles": n, "s": min(times), "peak_mb":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_mb": base,
            "grad_sum": float(x.grad.double().sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.reps)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576")
    rows = []
    for T in args.seqlens:
        got = {}
        for variant in ("slices", "split"):
            out = subprocess.run([sys.executable, __file__, "--worker", str(T), variant, "--reps", str(args.reps)],
                                 env=env, capture_output=True, text=True, check=True)
            got[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = got["slices"], got["split"]
        assert abs(a["grad_sum"] - b["grad_sum"]) <= 1e-6 * max(1.0, abs(a["grad_sum"])), (a, b)
        rows += [a, b]
    print("| T | tiles | slices s | split s | speed-up | slices peak MB | split peak MB |")
    print("|---|---|---|---|---|---|---|")
    for a, b in zip(rows[::2], rows[1::2]):
        print(f"| {a['T']} | {a['tiles']} | {a['s']:.3f} | {b['s']:.3f} | {a['s'] / b['s']:.2f}x | "
              f"{a['peak_mb']:.0f} | {b['peak_mb']:.0f} |")
    out = ROOT / "bench/results/tiled_mlp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"what": __doc__.splitlines()[0], "reps": args.reps, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
