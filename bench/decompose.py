"""Dataset decomposition benchmark: attention FLOPs per step for the same tokens per step.

Compares, at max sequence length 8192 and 65536 tokens per step:
- ``concat_chunk``: concatenate documents and cut 8192-token windows, full causal attention in
  each window (the paper's baseline): ``2 * rows * 8192^2`` per step;
- ``concat_chunk_masked``: the same windows with attention kept inside each document
  (seqshard's ``window`` builder);
- ``pack_bfd``: whole documents packed by best-fit decreasing, attention per document piece;
- ``dd_<schedule>``: dataset decomposition (min 256) under the curriculum sampler, one bucket
  per step: ``2 * tokens_per_step * L`` for chunk length L, averaged over the steps of whole cycles.
All costs are ``2 * sum L_i^2`` per layer per unit of head dim (the builders' ``attention_flops``).
Length distributions: those of bench/packing.py (100K documents), plus the published bucket sizes
of the decomposed DCLM-Baseline subset and Wikipedia (sequences per bucket 256..8192, from the
apple/ml-dataset-decomposition README), where only DD applies.
Goal (issue #6): DD / concat_chunk <= 1/3.

    python bench/decompose.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from packing import distributions  # noqa: E402  (bench/packing.py: the same length distributions)

from seqshard.data.curriculum import SCHEDULES, CurriculumSampler  # noqa: E402
from seqshard.parallel.decompose import decompose  # noqa: E402
from seqshard.parallel.packing import pack_pieces  # noqa: E402

MAX_LEN, MIN_LEN, TOKENS_PER_STEP = 8192, 256, 65536
DOCS = 100_000
PUBLISHED = {  # sequences per bucket, chunk lengths 256 .. 8192 (ml-dataset-decomposition README)
    "dclm_published": [14_581_760, 12_279_808, 7_587_840, 3_230_208, 1_320_192, 577_664],
    "wiki_published": [2_265_088, 1_595_392, 850_944, 353_280, 121_600, 37_248],
}


def concat_chunk_masked_flops_per_token(lengths: np.ndarray) -> float:
    """Documents concatenated in order and cut every MAX_LEN tokens; segments never cross docs."""
    ends = np.cumsum(lengths)
    cuts = np.union1d(ends, np.arange(MAX_LEN, ends[-1], MAX_LEN))
    segs = np.diff(np.concatenate([[0], cuts]))
    return 2.0 * float((segs.astype(np.float64) ** 2).sum()) / float(ends[-1])


def pack_flops_per_token(lengths: np.ndarray) -> float:
    pieces = pack_pieces(lengths, MAX_LEN, "bfd").pieces[:, 2].astype(np.float64)
    return 2.0 * float((pieces ** 2).sum()) / float(pieces.sum())


def dd_flops_per_step(bucket_sizes: dict[int, int], schedule: str, cycles: int = 8,
                      max_steps: int = 20_000) -> tuple[float, float]:
    """Mean attention FLOPs per step over whole cycles (about one pass over the decomposed data,
    at most ``max_steps``), and the mean chunk length."""
    tokens = sum(n * c for n, c in bucket_sizes.items())
    steps = min(max_steps, max(cycles, tokens // TOKENS_PER_STEP)) // cycles * cycles
    sampler = CurriculumSampler(bucket_sizes, TOKENS_PER_STEP, schedule, cycles, steps, seed=0)
    lens = np.array([sampler.next()[0] for _ in range(steps)], dtype=np.float64)
    return float((2.0 * TOKENS_PER_STEP * lens).mean()), float(lens.mean())


def main():
    rows_per_step = TOKENS_PER_STEP // MAX_LEN
    baseline = 2.0 * rows_per_step * MAX_LEN ** 2
    results = []
    print(f"{'dist':<15}{'method':<21}{'FLOPs/step':>14}{'vs concat_chunk':>17}")
    cases_by_dist = {}
    for dist, lengths in distributions(DOCS, np.random.default_rng(0)).items():
        cases_by_dist[dist] = ({"concat_chunk": baseline,
                                "concat_chunk_masked": concat_chunk_masked_flops_per_token(lengths) * TOKENS_PER_STEP,
                                "pack_bfd": pack_flops_per_token(lengths) * TOKENS_PER_STEP},
                               {n: len(c) for n, c in decompose(lengths, MAX_LEN, MIN_LEN).items()})
    for dist, counts in PUBLISHED.items():
        cases_by_dist[dist] = ({"concat_chunk": baseline}, dict(zip([256 << i for i in range(6)], counts)))
    for dist, (cases, bucket_sizes) in cases_by_dist.items():
        mean_len = {}
        for schedule in SCHEDULES:
            cases[f"dd_{schedule}"], mean_len[schedule] = dd_flops_per_step(bucket_sizes, schedule)
        for method, flops in cases.items():
            results.append({"dist": dist, "method": method, "flops_per_step": flops, "ratio": flops / baseline})
            print(f"{dist:<15}{method:<21}{flops:>14.4g}{flops / baseline:>17.3f}")
        print(f"{'':<15}mean DD chunk length: {mean_len['uniform']:.0f}")
    out = Path(__file__).parent / "results" / "decompose.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"max_len": MAX_LEN, "min_len": MIN_LEN, "tokens_per_step": TOKENS_PER_STEP,
                               "docs": DOCS, "rows": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
