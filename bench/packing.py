"""Packing benchmark: methods x length distributions x capacities x sizes.

Reports, per case, the bins against the lower bound ``ceil(tokens / capacity)``, the efficiency
``tokens / (bins * capacity)`` and the wall time of one ``pack_pieces`` call (one core, numpy).
Goal (issue #6): >= 99% of the bound at capacity 8K, and 1M lengths packed in < 2 s.

    python bench/packing.py            # 10K, 100K, 1M lengths
    python bench/packing.py --quick    # 10K, 100K
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sysconfig
import time
from pathlib import Path

import numpy as np

from seqshard.parallel.packing import METHODS, pack_pieces

CAPACITIES = (2048, 8192, 32768)
MAX_DOC = 1 << 20  # heavy-tailed mix: documents up to 1M tokens


def stdlib_lengths() -> np.ndarray:
    """The stdlib corpus: bytes of each .py file + BOS + EOS."""
    root = sysconfig.get_paths()["stdlib"]
    files = [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True) if "site-packages" not in f]
    return np.array([os.path.getsize(f) + 2 for f in files], dtype=np.int64)


def distributions(n: int, rng) -> dict[str, np.ndarray]:
    """``stdlib`` resampled to n documents; ``lognormal`` (median ~1.1K tokens, web-like);
    ``heavy_tail``: 90% lognormal(median 400) + 10% Pareto(alpha 1.1, from 2K), capped at 1M."""
    base = stdlib_lengths()
    heavy = np.where(rng.random(n) < 0.9, rng.lognormal(np.log(400), 1.0, n), 2048 * (1 + rng.pareto(1.1, n)))
    return {"stdlib": rng.choice(base, n),
            "lognormal": rng.lognormal(np.log(1100), 1.3, n).astype(np.int64) + 2,
            "heavy_tail": np.minimum(heavy.astype(np.int64) + 2, MAX_DOC)}


def run_case(lengths, capacity, method) -> dict:
    start = time.perf_counter()
    result = pack_pieces(lengths, capacity, method)
    elapsed = time.perf_counter() - start
    assert result.bin_lengths().max() <= capacity
    return {"bins": result.num_bins, "lower_bound": result.lower_bound,
            "bound_ratio": result.lower_bound / result.num_bins, "efficiency": result.efficiency,
            "pieces": len(result.pieces), "time_s": elapsed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10K and 100K lengths only")
    args = parser.parse_args()
    sizes = (10_000, 100_000) if args.quick else (10_000, 100_000, 1_000_000)
    rows = []
    print(f"{'dist':<11}{'n':>9}{'cap':>7} {'method':<7}{'bins':>9}{'bound':>9}{'bound/bins':>11}{'eff':>8}{'time s':>8}")
    for n in sizes:
        for dist, lengths in distributions(n, np.random.default_rng(0)).items():
            for capacity in CAPACITIES:
                for method in METHODS:
                    r = {"dist": dist, "n": n, "capacity": capacity, "method": method,
                         **run_case(lengths, capacity, method)}
                    rows.append(r)
                    print(f"{dist:<11}{n:>9}{capacity:>7} {method:<7}{r['bins']:>9}{r['lower_bound']:>9}"
                          f"{r['bound_ratio']:>11.4f}{r['efficiency']:>8.4f}{r['time_s']:>8.3f}")
    at_8k = [r for r in rows if r["capacity"] == 8192 and r["method"] != "greedy"]
    big = [r for r in rows if r["n"] == 1_000_000]
    summary = {"min_bound_ratio_8k_decreasing": min(r["bound_ratio"] for r in at_8k),
               "max_time_1m_s": {m: max(r["time_s"] for r in big if r["method"] == m) for m in METHODS} if big else {}}
    print(json.dumps(summary, indent=1))
    out = Path(__file__).parent / "results" / "packing.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "summary": summary,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
