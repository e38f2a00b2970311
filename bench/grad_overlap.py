"""How much of the torch engine's gradient all-reduce hides behind backward (issue #18).

2 gloo ranks, the same model and batch. Per step:
- ``flat``: backward, then one coalesced all-reduce of every gradient (the old path,
  ``all_reduce_gradients``): its whole time is exposed;
- ``bucketed``: ``BucketedGradReducer`` launches each bucket's async all-reduce from the
  post-accumulate-grad hooks during backward; only what ``finish()`` still waits for is exposed.
overlap fraction = 1 - exposed(bucketed) / exposed(flat), medians over the timed steps.

    python bench/grad_overlap.py       # ~1 minute on 2 cores
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

STEPS, WARMUP, TOKENS, BUCKET_MB = 4, 1, 512, 1.0
MODEL = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=259)


def overlap_rank(rank, world):
    import torch

    from seqshard.dist.grad_sync import BucketedGradReducer, all_reduce_gradients
    from seqshard.models import VarlenContext, build_model
    from seqshard.models.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(**MODEL))
    tokens = torch.randint(0, 259, (TOKENS,))
    positions = torch.arange(TOKENS)
    ctx = VarlenContext.from_lengths([TOKENS])
    reducer = BucketedGradReducer(model.parameters(), bucket_mb=BUCKET_MB)
    out = {"flat": [], "bucketed": [], "backward_s": [], "buckets": len(reducer.buckets)}
    for step in range(STEPS):
        for mode in ("flat", "bucketed"):
            model.zero_grad(set_to_none=True)
            loss = model(tokens, positions, ctx, tokens) / TOKENS
            if mode == "bucketed":
                reducer.arm()
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
    return out


def main():
    per_rank = run_ranks(2, overlap_rank, timeout=900)
    r = {k: statistics.median(v) if isinstance(v, list) else v for k, v in per_rank[0].items()}
    r["overlap_fraction"] = 1 - r["bucketed"] / r["flat"]
    print(f"model {MODEL}, {TOKENS} tokens/rank, bucket {BUCKET_MB} MB ({r['buckets']} buckets), 2 gloo ranks")
    print(f"backward {r['backward_s'] * 1e3:.1f} ms; exposed reduction: flat {r['flat'] * 1e3:.1f} ms, "
          f"bucketed {r['bucketed'] * 1e3:.1f} ms; overlap fraction {r['overlap_fraction']:.2f}")
    out = ROOT / "bench" / "results" / "grad_overlap.json"
    out.write_text(json.dumps({"model": MODEL, "tokens": TOKENS, "bucket_mb": BUCKET_MB, **r}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
