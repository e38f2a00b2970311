"""Ulysses communication without the attention kernel: seqshard vs DeepSpeed, side by side (issues #4, #32).

Two measurements, forward + backward, 4 gloo ranks, fp32, H = 8 heads (MHA) of D = 64, one
torch thread per rank; the "attention" is ``q + k + v`` on the head-split tensors everywhere:

(a) **exchange alone** (each rank holds its ``[T/P, ...]`` inputs already projected):

- ``old``: seqshard's ``ulysses.scatter_heads`` (q, k, v packed by ``torch.cat`` into one
  all-to-all) and ``gather_heads`` (a transpose copy back to ``[T/P, H, D]``); backward: one
  all-to-all of the output gradient, dq/dk/dv assembled into one buffer, one all-to-all.
- ``new``: the copy-free layer's exchange (``seqshard.parallel.ulysses_layer``): the input is
  already the send buffer ``[P, T/P, 3 h D]`` (the projection writes it there), q/k/v are views
  of the received buffer, the output ``[P*T/P, h, D]`` is sent as it is and stays
  ``[P(src), T/P, h D]`` (the o-projection reads it so); backward: dq/dk/dv written once into
  the backward send buffer. Head chunks (``--chunks``) pipeline the exchanges with the adds.
- ``deepspeed``: ``deepspeed.sequence.layer.DistributedAttention`` (one all-to-all per tensor
  q, k, v and the output; the same again in backward) around the same ``q + k + v``.

(b) **attention layer without the kernel**: ``x [T/P, dim=512]`` -> q/k/v projections ->
exchange -> ``q + k + v`` -> exchange back -> o-projection, with the same weights:

- ``new``: seqshard's native ``Attention`` under ``FusedUlysses`` (projection straight into the
  send buffer, o-projection from the received chunks, RoPE and norm skipped on both sides);
- ``old``: the same module's unchanged path (``nn.Linear`` projections, ``scatter_heads`` /
  ``gather_heads``, ``wo``);
- ``deepspeed``: separate ``nn.Linear`` projections + ``DistributedAttention`` + ``wo``.

Every method's output and input/weight gradients are checked equal to the others' once before
timing (bf16 wire: within 2e-2 relative). The ranks meet at a barrier before every rep; a rep's
time is the max over ranks; methods rotate order rep by rep (drift of a shared machine hits all);
the table shows the median over ``--reps``.

    python bench/ulysses_comm.py                                  # T = 4K, 16K, 64K, 256K
    python bench/ulysses_comm.py --seqlens 16384 --reps 5 --chunks 2 --comm-dtype bf16
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
EXCHANGE = ("old", "new", "deepspeed")
LAYER = ("old", "new", "deepspeed")


def _add3(q, k, v):
    return q + k + v  # the same two adds on every side


def _new_exchange(group, chunks, wire):
    """(a) ``new``: send buffers ``[P, T/P, 3 h_c D]`` per chunk (as the copy-free projection writes
    them) -> ``[P(src), T/P, h_c D]`` per chunk, the copy-free layer's exchanges and buffers."""
    import torch

    from seqshard.parallel.ulysses_layer import _start, _unwire, _wire

    class Exchange(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *sends):
            world, n = sends[0].shape[:2]
            hc = sends[0].shape[2] // (3 * D)
            waits = [_start(_wire(s, wire), group, "bench.qkv") for s in sends]
            for c in range(chunks):
                r = _unwire(waits[c](), sends[0].dtype).view(world * n, 3 * hc, D)
                o = r[:, :hc] + r[:, hc:2 * hc] + r[:, 2 * hc:]
                waits[c] = _start(_wire(o.view(world, n, hc * D), wire), group, "bench.out")
            return tuple(_unwire(w(), sends[0].dtype) for w in waits)

        @staticmethod
        def backward(ctx, *grads):
            world, n = grads[0].shape[:2]
            hc = grads[0].shape[2] // D
            waits = [_start(_wire(g.contiguous(), wire), group, "bench.out.bwd") for g in grads]
            back = []
            for c in range(chunks):
                go = _unwire(waits[c](), grads[0].dtype).view(world * n, hc, D)
                send = go.new_empty(world * n, 3 * hc, D, dtype=wire or go.dtype)
                for i in range(3):  # dq, dk, dv written once each into the send buffer
                    send[:, i * hc:(i + 1) * hc].copy_(go)
                back.append(_start(send.view(world, n, 3 * hc * D), group, "bench.qkv.bwd"))
            return tuple(_unwire(w(), grads[0].dtype) for w in back)

    return Exchange.apply


def _to_send(q, k, v, world, chunks):
    """``[T/P, H, D]`` q, k, v -> per chunk ``[P, T/P, 3 h_c D]`` (destination j: its chunk's
    q heads, then k, then v): the layout the copy-free projection writes."""
    import torch

    n, h = q.shape[0], q.shape[1] // world
    hc = h // chunks
    out = []
    for c in range(chunks):
        parts = []
        for j in range(world):
            sl = slice(j * h + c * hc, j * h + (c + 1) * hc)
            parts.append(torch.cat([t[:, sl] for t in (q, k, v)], dim=1).reshape(n, -1))
        out.append(torch.stack(parts))
    return out


def _from_back(backs, world, chunks):
    """per chunk ``[P(src), T/P, h_c D]`` -> ``[T/P, H, D]`` (for the value check only)."""
    import torch

    n = backs[0].shape[1]
    hc = backs[0].shape[2] // D
    pieces = [backs[c][j].view(n, hc, D) for j in range(world) for c in range(chunks)]
    return torch.cat(pieces, dim=1)


def _close(a, b, rtol):
    import torch

    scale = b.abs().max().clamp_min(1e-6)
    err = float((a - b).abs().max() / scale)
    assert err <= rtol, f"values differ: rel {err:.1e} > {rtol}"


def _time(fns, run, reps, warmup):
    import torch.distributed as dist

    names = list(fns)
    times = {m: [] for m in names}
    for i in range(warmup + reps):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            run(name)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def rank_bench(rank, world, seqlens, reps, warmup, chunks, comm_dtype, parts):
    import torch
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed.comm as ds_dist
    from deepspeed.sequence.layer import DistributedAttention

    from seqshard.models.config import ModelConfig
    from seqshard.models.llama import Attention
    from seqshard.parallel.parallelize import SPContext
    from seqshard.parallel.plan import ShardPlan
    from seqshard.parallel.ulysses import gather_heads, scatter_heads
    from seqshard.parallel.ulysses_layer import WIRE_DTYPES, FusedUlysses

    ds_dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    group = dist.group.WORLD
    wire = WIRE_DTYPES[comm_dtype]
    rtol = 2e-2 if wire is not None else 1e-5
    ds_layer = DistributedAttention(lambda q, k, v, *a, **kw: q + k + v, group, scatter_idx=2, gather_idx=0)

    def ds_exchange(q, k, v):  # [s, b, h, d] with batch_dim_idx 1: scatter heads (2), gather sequence (0)
        return ds_layer(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), 1)[:, 0]

    out = {}
    for total in seqlens:
        n = total // world
        gen = torch.Generator().manual_seed(rank)
        res = {}
        if "exchange" in parts:
            q, k, v, dout = (torch.randn(n, H, D, generator=gen) for _ in range(4))
            qkv = [t.requires_grad_() for t in (q, k, v)]
            sends = [s.detach().requires_grad_() for s in _to_send(q, k, v, world, chunks)]
            exchange = _new_exchange(group, chunks, wire)
            new_douts = [_dest_grad(dout, world, chunks, c) for c in range(chunks)]

            def run_ex(name):
                if name == "new":
                    for s in sends:
                        s.grad = None
                    o = exchange(*sends)
                    torch.autograd.backward(o, new_douts)
                    return _from_back(o, world, chunks)
                for t in qkv:
                    t.grad = None
                o = (gather_heads(_add3(*scatter_heads(*qkv, group)), group) if name == "old"
                     else ds_exchange(*qkv))
                o.backward(dout)
                return o

            got = {m: run_ex(m).detach() for m in EXCHANGE}
            for m in EXCHANGE:  # values: outputs and input gradients
                _close(got[m], got["old"], rtol)
            run_ex("old")
            ref_grads = [t.grad.clone() for t in qkv]
            run_ex("new")
            for c, s in enumerate(sends):
                want = _to_send(*ref_grads, world, chunks)[c]
                _close(s.grad, want, rtol)
            run_ex("deepspeed")
            for t, g in zip(qkv, ref_grads):
                _close(t.grad, g, 1e-5)
            res["exchange"] = _time({m: None for m in EXCHANGE}, run_ex, reps, warmup)
        if "layer" in parts:
            torch.manual_seed(0)  # the same weights on every rank and for every method
            cfg = ModelConfig(dim=H * D, n_heads=H, n_kv_heads=H, ffn_dim=64)
            attn = Attention(cfg)
            attn.rotate = lambda t, positions, which: t  # no RoPE on any side
            plan = ShardPlan.build([0, total], world, "stream")
            positions = plan.shard(torch.arange(total), rank)
            x = torch.randn(n, H * D, generator=gen).requires_grad_()
            dout = torch.randn(n, H * D, generator=gen)
            fused = FusedUlysses(chunks, comm_dtype, kernel=_add3)

            def old_fn(q, k, v, ctx, **_):
                return gather_heads(_add3(*scatter_heads(q, k, v, group)), group)

            def run_layer(name):
                x.grad = None
                for p in attn.parameters():
                    p.grad = None
                ctx = SPContext(plan, group)
                if name == "new":
                    o = fused(attn, x, positions, ctx)
                elif name == "old":
                    attn.attention_fn = old_fn
                    o = attn.standard_forward(x, positions, ctx)
                else:
                    qh, kh, vh = (lin(x).view(n, H, D) for lin in (attn.wq, attn.wk, attn.wv))
                    o = attn.wo(ds_exchange(qh, kh, vh).reshape(n, H * D))
                o.backward(dout)
                return o.detach(), x.grad.clone(), [p.grad.clone() for p in attn.parameters()]

            got = {m: run_layer(m) for m in LAYER}
            for m in LAYER:
                _close(got[m][0], got["old"][0], rtol)
                _close(got[m][1], got["old"][1], rtol)
                for a, b in zip(got[m][2], got["old"][2]):
                    _close(a, b, rtol)
            del got
            res["layer"] = _time({m: None for m in LAYER}, run_layer, reps, warmup)
        out[total] = res
    return out


def _dest_grad(dout, world, chunks, c):
    """The output gradient in the new layout ``[P(src), T/P, h_c D]`` for chunk c."""
    n = dout.shape[0]
    h = H // world
    hc = h // chunks
    import torch

    return torch.stack([dout[:, j * h + c * hc: j * h + (c + 1) * hc].reshape(n, -1) for j in range(world)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="*", default=[4096, 16384, 65536, 262144])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=1, help=f"head chunks of the new path (divides H / P = {H // P})")
    ap.add_argument("--comm-dtype", default="fp32", choices=("fp32", "bf16"), help="the new path's wire dtype")
    ap.add_argument("--parts", nargs="*", default=["exchange", "layer"], choices=("exchange", "layer"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ulysses_comm.json"))
    args = ap.parse_args()
    if args.chunks < 1 or (H // P) % args.chunks:
        ap.error(f"--chunks {args.chunks} must divide the {H // P} query heads each of the {P} ranks holds")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    per_rank = run_ranks(P, rank_bench, args.seqlens, args.reps, args.warmup, args.chunks, args.comm_dtype,
                         args.parts, timeout=3600)
    rows, goal = [], {}
    for total in args.seqlens:
        for part in args.parts:
            methods = EXCHANGE if part == "exchange" else LAYER
            med = {m: statistics.median(max(r[total][part][m][i] for r in per_rank) for i in range(args.reps))
                   for m in methods}
            row = {"T": total, "part": part, **{f"{m}_ms": med[m] * 1e3 for m in methods},
                   "new_vs_deepspeed": med["new"] / med["deepspeed"], "old_vs_deepspeed": med["old"] / med["deepspeed"],
                   "per_rank_s": [{m: r[total][part][m] for m in methods} for r in per_rank]}
            rows.append(row)
            if total in (16384, 65536):
                goal[f"{part} T={total}"] = {"value": row["new_vs_deepspeed"], "goal": "<= 0.85",
                                             "met": row["new_vs_deepspeed"] <= 0.85}
    print(f"chunks {args.chunks}, comm_dtype {args.comm_dtype}, {P} ranks, H {H}, D {D}, fp32 compute")
    print(f"{'T':>7} {'part':>9} {'old ms':>9} {'new ms':>9} {'deepspeed ms':>13} {'new/ds':>7} {'old/ds':>7}")
    for r in rows:
        print(f"{r['T']:>7} {r['part']:>9} {r['old_ms']:>9.1f} {r['new_ms']:>9.1f} {r['deepspeed_ms']:>13.1f} "
              f"{r['new_vs_deepspeed']:>7.2f} {r['old_vs_deepspeed']:>7.2f}")
    for key, g in goal.items():
        print(f"goal {key}: new seqshard / deepspeed {g['value']:.2f} ({'MET' if g['met'] else 'NOT MET'}, goal <= 0.85)")
    import deepspeed
    import torch

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "measured_how": __doc__, "config": {"P": P, "heads": H, "head_dim": D, "dtype": "fp32", "reps": args.reps,
                                            "warmup": args.warmup, "chunks": args.chunks,
                                            "comm_dtype": args.comm_dtype},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "deepspeed": deepspeed.__version__, "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "rows": rows, "goal_new_vs_deepspeed": goal}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
