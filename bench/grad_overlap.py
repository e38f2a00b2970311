"""How much of the torch engine's gradient all-reduce hides behind backward (issue #18).

2 gloo ranks, the same model and batch. Per step:
- ``flat``: backward, then one coalesced all-reduce of every gradient (the old path,
  ``all_reduce_gradients``): its whole time is exposed;
- ``bucketed``: ``BucketedGradReducer`` launches each bucket's async all-reduce from the
  post-accumulate-grad hooks during backward; only what ``finish()`` still waits for is exposed.
overlap fraction = 1 - exposed(bucketed) / exposed(flat), medians over the timed steps (a barrier
before each backward, so one rank waiting for the other is not counted as reduction).

    python bench/grad_overlap.py                                 # 1 MB buckets, ~1 minute on 2 cores
    python bench/grad_overlap.py --model tiny --bucket-mb default  # examples/tiny.yaml's model, the
                                                                   # engine's default bucket size
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.ranks import run_ranks  # noqa: E402

STEPS, WARMUP, TOKENS = 4, 1, 512
MODELS = {"bench": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=259),
          "tiny": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=259)}


def overlap_rank(rank, world, model_kwargs, bucket_mb, steps):
    import torch
    import torch.distributed as dist

    from seqshard.dist.grad_sync import BucketedGradReducer, all_reduce_gradients
    from seqshard.models import VarlenContext, build_model
    from seqshard.models.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(**model_kwargs))
    tokens = torch.randint(0, 259, (TOKENS,))
    positions = torch.arange(TOKENS)
    ctx = VarlenContext.from_lengths([TOKENS])
    reducer = BucketedGradReducer(model.parameters(), bucket_mb=bucket_mb)  # None: the engine's default
    sizes = [sum(p.numel() * p.element_size() for p in b) / 2**20 for b in reducer.buckets]
    out = {"flat": [], "bucketed": [], "backward_s": [], "buckets": len(reducer.buckets),
           "largest_bucket_mb": max(sizes), "grad_mb": sum(sizes)}
    for step in range(steps):
        for mode in ("flat", "bucketed"):
            model.zero_grad(set_to_none=True)
            loss = model(tokens, positions, ctx, tokens) / TOKENS
            if mode == "bucketed":
                reducer.arm()
            dist.barrier()  # both ranks start backward together: rank skew is not counted as reduction
            t0 = time.perf_counter()
            loss.backward()
            t1 = time.perf_counter()
            if mode == "bucketed":
                reducer.finish()
            else:
                all_reduce_gradients(model.parameters())
            if step >= WARMUP:
                out[mode].append(time.perf_counter() - t1)
                if mode == "flat":
                    out["backward_s"].append(t1 - t0)
    import resource

    out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # max RSS of rank 0
    return out


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="bench")
    parser.add_argument("--bucket-mb", default="1", help="MB per bucket, or 'default' (the engine's rule)")
    parser.add_argument("--steps", type=int, default=STEPS, help="timed steps + 1 warmup")
    args = parser.parse_args()
    bucket_mb = None if args.bucket_mb == "default" else float(args.bucket_mb)
    per_rank = run_ranks(2, overlap_rank, MODELS[args.model], bucket_mb, args.steps, timeout=900)
    r = {k: statistics.median(v) if isinstance(v, list) else v for k, v in per_rank[0].items()}
    r["overlap_fraction"] = 1 - r["bucketed"] / r["flat"]
    print(f"model {args.model} {MODELS[args.model]} ({r['grad_mb']:.2f} MB of gradients), {TOKENS} tokens/rank, "
          f"bucket {args.bucket_mb} MB ({r['buckets']} buckets, largest {r['largest_bucket_mb']:.2f} MB), 2 gloo ranks")
    print(f"backward {r['backward_s'] * 1e3:.1f} ms; exposed reduction: flat {r['flat'] * 1e3:.1f} ms, "
          f"bucketed {r['bucketed'] * 1e3:.1f} ms; overlap fraction {r['overlap_fraction']:.2f}; "
          f"peak RSS {r['peak_mem_mb']:.0f} MB")
    name = "grad_overlap" if args.model == "bench" else f"grad_overlap_{args.model}"
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.write_text(json.dumps({"model": MODELS[args.model], "tokens": TOKENS, "bucket_mb": args.bucket_mb,
                               "steps_timed": args.steps - WARMUP, **r}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
