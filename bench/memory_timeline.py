"""Where the memory model's per-token constants come from (issue #15): the torch profiler's
memory timeline of one training step of the tiny model, on real gloo ranks.

For each case, rank 0 runs one step of ``seqshard.train.trainer.train`` (``examples/tiny.yaml``'s
model, fp32, one document of ``L`` tokens, ``train.activation_checkpointing: selective``) under
``torch.profiler.profile(profile_memory=True)`` and exports the memory timeline: the bytes of live
tensors the CPU allocator holds over time (summed from the profiler's allocation records). The peak is printed per local token
beside the memory model's tensor terms (its prediction without the process runtime and without
the CPU-only RSS term ``CPU_SP_EXTRA``), so the table shows how well the model's
``WORK_FACTOR``/``ATTN_WORKSPACE`` describe the tensors actually alive.

  python bench/memory_timeline.py                  # sp=1 and sp=4 (ulysses, ring) at 16K and 32K
  python bench/memory_timeline.py --cases 8192:1:none 32768:4:ring
Writes bench/results/memory_timeline.json. Peak RSS is not measured here (bench/capacity.py does).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _overrides(L, sp, method, data_dir, out):
    o = [f"data.source={data_dir}", f"data.max_seq_len={L}", f"data.tokens_per_step={L}", "train.steps=1",
         "train.warmup_steps=1", "train.checkpoint_every=0", f"train.output_dir={out}", "train.log_every=100",
         "train.activation_checkpointing=selective"]
    if sp > 1:
        o += [f"parallel.sp={sp}", f"parallel.sp_method={method}"]
    return o


def rank_fn(rank, world, L, sp, method, data_dir, out):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from seqshard.launch.spec import apply_overrides, from_dict, load_raw
    from seqshard.train.trainer import train

    spec = from_dict(apply_overrides(load_raw(ROOT / "examples/tiny.yaml"), _overrides(L, sp, method, data_dir, out)),
                     world)
    if rank != 0:
        train(spec)
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=False) as prof:
        train(spec)
    return live_peak(prof)[0]


def live_peak(prof, top: int = 0):
    """(peak bytes, sites): the largest sum of live CPU allocations over the profile, from every
    allocation and free event (the profiler's raw records, in time order; the same figure as the
    memory timeline's total, without its data-flow pass, which asserts on some long runs in torch
    2.13), and the ``top`` largest groups of the allocations alive at that peak, each
    ``(op chain, bytes, count)`` by the op that allocated them and its three nearest callers."""
    from collections import defaultdict

    from torch._C._profiler import _EventType

    events, stack = [], [(e, None) for e in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        e, parent = stack.pop()
        stack.extend((c, e) for c in e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            chain = []
            while parent is not None and len(chain) < 4:
                chain.append(parent.name)
                parent = parent.parent
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.ptr, " < ".join(chain)))
    events.sort(key=lambda ev: ev[0])
    live = peak = 0
    at = -1
    for i, (_, size, _, _) in enumerate(events):
        live += size
        if live > peak:
            peak, at = live, i
    alive = {}
    for _, size, ptr, chain in events[:at + 1] if top else ():
        if size > 0:
            alive[ptr] = (size, chain)
        else:
            alive.pop(ptr, None)
    groups = defaultdict(lambda: [0, 0])
    for size, chain in alive.values():
        groups[chain][0] += size
        groups[chain][1] += 1
    sites = sorted(((c, b, n) for c, (b, n) in groups.items()), key=lambda g: -g[1])[:top]
    return float(peak), sites


def predicted_tensor_bytes(L, sp, method, data_dir, out):
    from seqshard.launch.spec import apply_overrides, from_dict, load_raw
    from seqshard.parallel import memory_model as mm

    spec = from_dict(apply_overrides(load_raw(ROOT / "examples/tiny.yaml"), _overrides(L, sp, method, data_dir, out)),
                     sp)
    c = mm.config_from_spec(spec, sp, "cuda")  # cuda: no runtime, no CPU RSS term: tensors only
    return mm.predict_peak(spec.model, L, dataclasses.replace(c, device="cuda"))["total"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["16384:1:none", "16384:4:ulysses", "16384:4:ring", "32768:1:none",
                                                    "32768:4:ulysses", "32768:4:ring"],
                    metavar="L:SP:METHOD")
    ap.add_argument("--out", default=str(ROOT / "bench/results/memory_timeline.json"))
    args = ap.parse_args()
    from capacity import make_corpus
    from tests.helpers.ranks import run_ranks

    work = Path(tempfile.mkdtemp(prefix="memtl-"))
    data_dir = make_corpus(work / "data")
    rows = []
    for case in args.cases:
        L, sp, method = case.split(":")
        L, sp = int(L), int(sp)
        out = str(work / case.replace(":", "_"))
        peak = run_ranks(sp, rank_fn, L, sp, method, str(data_dir), out, timeout=1800)[0]
        pred = predicted_tensor_bytes(L, sp, method, str(data_dir), out)
        rows.append({"seq_len": L, "sp": sp, "method": method, "tensor_peak_mb": peak / 2**20,
                     "tensor_bytes_per_local_token": peak / (L / sp), "predicted_tensor_mb": pred / 2**20,
                     "predicted_over_measured": pred / peak})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "what": "torch profiler memory timeline peak, rank 0, "
                                          "one selective step of the tiny model, fp32 CPU gloo"}, indent=1) + "\n")
    sp1 = {r["seq_len"]: r["tensor_peak_mb"] for r in rows if r["sp"] == 1}
    print("| L | sp | method | tensor peak MB | bytes / local token | model MB | model / measured | vs sp=1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = sp1.get(r["seq_len"]) if r["sp"] > 1 else None
        print(f"| {r['seq_len'] // 1024}K | {r['sp']} | {r['method']} | {r['tensor_peak_mb']:.0f} | "
              f"{r['tensor_bytes_per_local_token']:.0f} | {r['predicted_tensor_mb']:.0f} | "
              f"{r['predicted_over_measured']:.2f} | {r['tensor_peak_mb'] / base:.2f} |" if base else
              f"| {r['seq_len'] // 1024}K | {r['sp']} | {r['method']} | {r['tensor_peak_mb']:.0f} | "
              f"{r['tensor_bytes_per_local_token']:.0f} | {r['predicted_tensor_mb']:.0f} | "
              f"{r['predicted_over_measured']:.2f} | |")


if __name__ == "__main__":
    main()
