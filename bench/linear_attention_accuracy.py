"""Triton linear attention (chunk form) against the fp64 per-token recurrence under strong decays.

fp32 inputs, h = 2 heads of K = V = 8, one document of T tokens or documents with resets, a random
initial state per document, the decay patterns of ``tests/kernels/test_shapes.py`` (constant 0,
-1, -10, -30; uniform in [-30, 0]; strong then weak; sparse -30), chunk sizes 16 / 32 / 64.
For each quantity (o, final state, dq, dk, dv, dg, d initial_state) the largest error relative to
the reference's largest entry, over every case, and the case it came from. Runs the Triton kernel
under ``TRITON_INTERPRET=1`` when no GPU is present (the only way it has run so far).

    PYTHONPATH=. python bench/linear_attention_accuracy.py            # T = 40 (table + JSON)
    PYTHONPATH=. python bench/linear_attention_accuracy.py --t 150    # documents 37, 1, 62, 50
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from seqshard.kernels.linear_attention import linear_attention, naive_linear_attention, triton_chunk  # noqa: E402
from tests.kernels.test_shapes import decay_patterns  # noqa: E402

NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "d_initial_state")
TOL = 1e-5


def outputs_and_grads(fn, inputs, weights):
    ins = [x.clone().requires_grad_() for x in inputs]
    o, state = fn(*ins)
    ((o.double() * weights[0]).sum() + (state.double() * weights[1]).sum()).backward()
    return [o.detach(), state.detach()] + [x.grad for x in ins]


def measure(t, chunks=(16, 32, 64)):
    """-> {name: (max rel err, decay pattern, chunk, resets)}, [failing cases]."""
    worst, failing = {}, []
    for resets in (False, True):
        gen = torch.Generator().manual_seed(7 + resets)
        h, dk, dv = 2, 8, 8
        q, k, v = (torch.randn(1, t, h, d, generator=gen) for d in (dk, dk, dv))
        bounds = ([0, 37, 38, 100, t] if t == 150 else [0, t // 2 - 3, t // 2 - 2, t]) if resets else [0, t]
        cu = torch.tensor(bounds, dtype=torch.int32)
        s0 = torch.randn(len(bounds) - 1, h, dk, dv, generator=gen)
        weights = [torch.randn(1, t, h, dv, generator=gen).double(),
                   torch.randn(len(bounds) - 1, h, dk, dv, generator=gen).double()]
        for label, g in decay_patterns(t, h, gen).items():
            ref = outputs_and_grads(
                lambda q, k, v, g, s: linear_attention(q, k, v, g, None, s, True, cu, impl=naive_linear_attention),
                [x.double() for x in (q, k, v, g, s0)], weights)
            for c in chunks:
                triton_chunk.CHUNK = c
                got = outputs_and_grads(
                    lambda q, k, v, g, s: triton_chunk.triton_linear_attention(q, k, v, g, None, s, True, cu),
                    (q, k, v, g, s0), weights)
                for name, a, b in zip(NAMES, got, ref):
                    err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
                    if err > worst.get(name, (0.0,))[0]:
                        worst[name] = (err, label, c, resets)
                    if err > TOL:
                        failing.append({"name": name, "rel_err": err, "decay": label, "chunk": c, "resets": resets})
    return worst, failing


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    worst, failing = measure(args.t)
    print(f"T = {args.t}, fp32, Triton {'interpreter' if triton_chunk.INTERPRET else 'compiled'}; "
          f"max rel err vs the fp64 recurrence (tolerance {TOL:g})")
    print(f"{'quantity':16s} {'max rel err':>12s}  worst case")
    for name in NAMES:
        err, label, c, resets = worst[name]
        print(f"{name:16s} {err:12.2e}  {label}, chunk {c}, {'resets' if resets else 'one document'}")
    print(f"{len(failing)} case(s) above tolerance")
    out = Path(__file__).parent / "results" / f"linear_attention_accuracy_t{args.t}.json"
    out.write_text(json.dumps({"t": args.t, "interpreter": triton_chunk.INTERPRET, "tolerance": TOL,
                               "max_rel_err": {n: dict(zip(("rel_err", "decay", "chunk", "resets"), worst[n]))
                                               for n in NAMES},
                               "above_tolerance": failing}, indent=1) + "\n")


if __name__ == "__main__":
    main()
