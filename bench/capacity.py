"""Context capacity of the tiny model on this CPU machine (issue #15): peak memory per rank vs
sequence length, one document per step, measured beside the memory model's prediction.

A folder with one ``.txt`` document of >= 1M byte tokens is written from the stdlib corpus, so
every step is one window of ``L`` tokens of one document (``data.max_seq_len =
data.tokens_per_step = L``). Each case is a fresh ``torchrun`` job (``seqshard train``, fp32,
gloo, ``examples/tiny.yaml``'s model, 2 steps, ``train.activation_checkpointing: selective``);
the peak is ``peak_mem_mb`` of metrics.jsonl (rank 0's ``ru_maxrss``: the whole process, the
Python runtime included), the max over the steps. The prediction is
``seqshard.parallel.memory_model.predict_peak`` with ``device="cpu"``.

  python bench/capacity.py            # sp=1 8K-64K; sp=4 ulysses and ring zigzag 32K-128K
  python bench/capacity.py --quick    # sp=1 4K-16K; sp=4 at 16K and 32K
A case that fails or passes ``--case-timeout`` is reported with its prediction and the reason.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqshard.launch.spec import apply_overrides, from_dict, load_raw  # noqa: E402
from seqshard.parallel import memory_model as mm  # noqa: E402


def make_corpus(folder: Path, min_tokens: int = 1 << 20) -> Path:
    """One .txt document of at least ``min_tokens`` bytes (byte tokenizer: 1 token per byte)."""
    from seqshard.data.corpus import load_corpus

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "long.txt"
    if path.is_file() and path.stat().st_size >= min_tokens:
        return folder
    corpus = load_corpus("stdlib")
    parts, size, i = [], 0, 0
    while size < min_tokens:
        text = bytes(int(t) for t in corpus.tokens(i % len(corpus.lengths)) if int(t) < 256).decode("utf-8", "ignore")
        parts.append(text)
        size += len(text.encode())
        i += 1
    path.write_text("\n".join(parts))
    return folder


def overrides(L, sp, method, data_dir, out_dir, ac):
    o = [f"data.source={data_dir}", f"data.max_seq_len={L}", f"data.tokens_per_step={L}", "train.steps=2",
         "train.warmup_steps=1", "train.checkpoint_every=0", f"train.output_dir={out_dir}",
         f"train.activation_checkpointing={ac}", f"launch.nproc_per_node={sp}"]
    if sp > 1:
        o += [f"parallel.sp={sp}", f"parallel.sp_method={method}"]
        if method == "ring":
            o.append("parallel.layout=zigzag")
    return o


def predict(ov, sp):
    spec = from_dict(apply_overrides(load_raw(ROOT / "examples/tiny.yaml"), ov), sp)
    c = mm.config_from_spec(spec, sp, "cpu")
    return mm.predict_peak(spec.model, spec.data.max_seq_len, c)["total"] / 2**20


def run_case(L, sp, method, data_dir, work, timeout, ac="selective"):
    out = work / f"{method}_sp{sp}_{L}"
    ov = overrides(L, sp, method, data_dir, out, ac)
    row = {"seq_len": L, "sp": sp, "method": method, "checkpointing": ac, "predicted_mb": predict(ov, sp)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={sp}", "-m", "seqshard", "train",
           str(ROOT / "examples/tiny.yaml")] + [a for o in ov for a in ("--set", o)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    # a session of its own, so a timeout kills torchrun's workers too (not only torchrun)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        ok = proc.returncode == 0
        why = "" if ok else err.strip().splitlines()[-1][:200] if err.strip() else f"rc {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        ok, why = False, f"did not finish within {timeout}s (prediction only)"
    row["wall_s"] = time.perf_counter() - start
    if ok:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        row.update(measured_mb=max(r["peak_mem_mb"] for r in rows), step_time_s=rows[-1]["step_time_s"],
                   loss=rows[-1]["loss"])
        row["predicted_over_measured"] = row["predicted_mb"] / row["measured_mb"]
    else:
        row["error"] = why
    print(json.dumps(row), flush=True)
    return row


def growth_exponent(rows):
    pts = [(math.log(r["seq_len"]), math.log(r["measured_mb"])) for r in rows if "measured_mb" in r]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def table(rows, sp1):
    lines = ["| L | sp | method | measured peak MB/rank | predicted MB | pred/meas | vs sp=1 | step s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = sp1.get(r["seq_len"])
        ratio = f"{r['measured_mb'] / base:.2f}" if r["sp"] > 1 and base and "measured_mb" in r else ""
        meas = f"{r['measured_mb']:.0f}" if "measured_mb" in r else f"not run: {r.get('error', '')}"
        pm = f"{r['predicted_over_measured']:.2f}" if "measured_mb" in r else ""
        st = f"{r['step_time_s']:.1f}" if "step_time_s" in r else ""
        lines.append(f"| {r['seq_len'] // 1024}K | {r['sp']} | {r['method']} | {meas} | {r['predicted_mb']:.0f} | "
                     f"{pm} | {ratio} | {st} |")
    return "\n".join(lines)


def retable(paths, out):
    """Measured rows of earlier runs beside the current model's prediction (nothing is run)."""
    merged = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            if "measured_mb" in r:
                merged[(r["seq_len"], r["sp"], r["method"])] = dict(r, source=str(path))
    rows = []
    for (L, sp, method), r in sorted(merged.items()):
        r["predicted_mb"] = predict(overrides(L, sp, method, "stdlib", "/tmp/unused", r["checkpointing"]), sp)
        r["predicted_over_measured"] = r["predicted_mb"] / r["measured_mb"]
        rows.append(r)
    L = 262144  # too long to measure here: the prediction only
    for sp, method in ((1, "none"), (4, "ulysses"), (4, "ring")):
        rows.append({"seq_len": L, "sp": sp, "method": method, "checkpointing": "selective",
                     "predicted_mb": predict(overrides(L, sp, method, "stdlib", "/tmp/unused", "selective"), sp),
                     "error": "prediction only (over 30 min per case here)"})
    sp1 = {r["seq_len"]: r["measured_mb"] for r in rows if r["sp"] == 1 and "measured_mb" in r}
    exponent = growth_exponent([r for r in rows if r["sp"] == 1])
    Path(out).write_text(json.dumps({"rows": rows, "sp1_growth_exponent": exponent, "merged_from": paths,
                                     "runtime_bytes_assumed": mm.RUNTIME_BYTES["cpu"]}, indent=1) + "\n")
    print(table(rows, sp1))
    print(f"sp=1 growth exponent of peak memory in L: {exponent}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case-timeout", type=float, default=900)
    ap.add_argument("--out", default=str(ROOT / "bench/results/capacity.json"))
    ap.add_argument("--cases", nargs="+", metavar="L:SP:METHOD",
                    help="run only these cases, e.g. 131072:4:ulysses 2048:1:none (L in tokens)")
    ap.add_argument("--table-from", nargs="+", metavar="JSON",
                    help="run nothing: merge these results files' measured rows (a later file wins for the same "
                         "case), re-predict each with the current memory model, print the table, write --out")
    args = ap.parse_args()
    if args.table_from:
        return retable(args.table_from, args.out)
    k = 1024
    sp1_lens = [4 * k, 8 * k, 16 * k] if args.quick else [8 * k, 16 * k, 32 * k, 64 * k]
    sp4_lens = [16 * k, 32 * k] if args.quick else [32 * k, 64 * k, 128 * k]
    work = Path(tempfile.mkdtemp(prefix="capacity-"))
    data_dir = make_corpus(work / "data")
    # shorter cases first, so a late timeout still leaves the sp=1 / sp=4 pairs measured
    cases = sorted([(L, 1, "none") for L in sp1_lens] + [(L, 4, m) for L in sp4_lens for m in ("ulysses", "ring")],
                   key=lambda c: (c[0], c[1]))
    if args.cases:
        cases = [(int(L), int(sp), m) for L, sp, m in (c.split(":") for c in args.cases)]
    rows = []
    for L, sp, method in cases:
        rows.append(run_case(L, sp, method, data_dir, work, args.case_timeout))
        sp1 = {r["seq_len"]: r["measured_mb"] for r in rows if r["sp"] == 1 and "measured_mb" in r}
        exponent = growth_exponent([r for r in rows if r["sp"] == 1])
        result = {"rows": rows, "sp1_growth_exponent": exponent, "quick": args.quick,
                  "model": "examples/tiny.yaml shape, fp32, CPU, gloo, 2 steps, selective checkpointing",
                  "runtime_bytes_assumed": mm.RUNTIME_BYTES["cpu"]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # after every case
    print(table(rows, sp1))
    print(f"sp=1 growth exponent of peak memory in L: {exponent}")


if __name__ == "__main__":
    main()
