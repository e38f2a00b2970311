"""Pack vs decompose batching on a corpus holding one huge document (issue 16, item 7).

    PYTHONPATH=. python bench/long_document.py [--mb 5] [--steps 5]

Writes a corpus of one ``--mb`` MB document plus --short (3) short ones (jsonl), loads it through
``load_corpus`` (the real path), and times ``next_batch`` of the pack and decompose builders at
max_seq_len 256 / tokens_per_step 4096. Reports the seconds per step (median), the pieces the
pack builder keeps in its pool, the token copies of the long document those pieces hold, and
peak RSS. Writes bench/results/long_document.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from seqshard.data.builders import DecomposeBuilder, PackBuilder
from seqshard.data.corpus import load_corpus


def make_corpus(folder: Path, mb: int, n_short: int):
    rng = np.random.default_rng(0)
    long_text = "".join(rng.choice(list("abcdefgh \n"), size=mb * 2**20))
    rows = [{"text": long_text}] + [{"text": "short doc %d " % i * int(rng.integers(1, 60))} for i in range(n_short)]
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_corpus(str(path), cache_dir=str(folder / "cache"))


def time_steps(builder, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        builder.next_batch()
        times.append(time.perf_counter() - start)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--short", type=int, default=3, help="short documents beside the long one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(tmp), args.mb, args.short)
        long_doc = int(np.argmax(corpus.lengths))
        pack = PackBuilder(corpus, 256, 4096, "bfd", seed=0)
        pack_times = time_steps(pack, args.steps)
        pool = pack.carry
        copies = float(pool[pool[:, 0] == long_doc, 2].sum()) / corpus.lengths[long_doc]
        dec = DecomposeBuilder(corpus, 256, 16, 4096, seed=0)
        dec_times = time_steps(dec, args.steps)
    result = {"mb": args.mb, "steps": args.steps, "pack_s_per_step": statistics.median(pack_times),
              "decompose_s_per_step": statistics.median(dec_times), "pack_pool_pieces": int(len(pool)),
              "pack_long_document_copies": copies,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"{'builder':>10} {'s/step (median)':>16}")
    print(f"{'pack':>10} {result['pack_s_per_step']:16.3f}")
    print(f"{'decompose':>10} {result['decompose_s_per_step']:16.3f}")
    print(f"pack pool: {result['pack_pool_pieces']} pieces, {copies:.1f} copies of the long document; "
          f"peak RSS {result['peak_rss_mb']:.0f} MB")
    out = Path(__file__).parent / "results" / "long_document.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
