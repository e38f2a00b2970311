"""Plots and report section of the long-context evaluation (``train/long_eval.py``'s results).

Drawn from the JSON the evaluation writes (STYLE rule 11): loss by position as one line per
series against the token position, with the trained length marked; passkey accuracy as a
depth x length heatmap. ``add_to_report`` appends each run's ``eval_long.jsonl`` (loss by
position at every evaluated step, passkey at the last) to a report folder written by :func:`seqshard.report.report.write_report`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_by_position(series: dict, path, trained_len: int | None = None, title: str = "") -> Path:
    """``series``: ``{label: [{start, end, loss, tokens}]}`` -> one PNG, loss against position."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, buckets in series.items():
        pts = [b for b in buckets if b["tokens"]]
        ax.plot([(b["start"] + b["end"]) / 2 for b in pts], [b["loss"] for b in pts], marker="o", ms=3, label=label)
    if trained_len:
        ax.axvline(trained_len, color="grey", ls="--", lw=1)
        ax.text(trained_len, ax.get_ylim()[1], f" trained length {trained_len}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("position in document (tokens of context - 1)")
    ax.set_ylabel("mean token loss (nats)")
    ax.set_title(title or "held-out loss by position", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_passkey(cells: list[dict], path, title: str = "") -> Path:
    """``cells``: ``[{length, depth, accuracy, ...}]`` -> a depth x length accuracy heatmap PNG."""
    plt = _plt()
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    probs = [[float("nan")] * len(lengths) for _ in depths]
    for c in cells:
        grid[depths.index(c["depth"])][lengths.index(c["length"])] = c["accuracy"]
        probs[depths.index(c["depth"])][lengths.index(c["length"])] = c["key_prob"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.55 * len(depths) + 1.9))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            p = probs[i][j]
            ax.text(j, i, f"{v:.2f}\n{math.log10(p) if p > 0 else float('-inf'):.1f}", ha="center", va="center",
                    fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title((title or "passkey retrieval (teacher-forced)") + "\ncell: accuracy, log10 P(exact key)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def by_position_table(series: dict) -> str:
    """Markdown: one row per bucket, one loss column per series."""
    labels = list(series)
    first = series[labels[0]]
    lines = ["| positions | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for i, b in enumerate(first):
        cells = [f"{series[k][i]['loss']:.3f}" if series[k][i]["tokens"] else "-" for k in labels]
        lines.append(f"| {b['start']}-{b['end'] - 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def passkey_table(cells: list[dict]) -> str:
    lines = ["| length | depth | accuracy | key prob | trials |", "|---|---|---|---|---|"]
    lines += [f"| {c['length']} | {c['depth']:g} | {c['accuracy']:.2f} | {c['key_prob']:.3g} | {c['trials']} |"
              for c in cells]
    return "\n".join(lines)


def read_records(run_dir) -> list[dict]:
    """The records of ``<run_dir>/eval_long.jsonl`` (one per evaluated step; a resumed run may
    repeat a step: the later record wins)."""
    path = Path(run_dir) / "eval_long.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def run_dirs_with_results(paths) -> list[Path]:
    """Folders at or under ``paths`` holding an ``eval_long.jsonl``, in path order."""
    found = []
    for p in map(Path, paths):
        hits = [p] if (p / "eval_long.jsonl").is_file() else sorted(f.parent for f in p.rglob("eval_long.jsonl"))
        found += [h for h in hits if h not in found]
    return found


def add_to_report(out, paths) -> list[Path]:
    """Append the latest long-context evaluation of each run at or under ``paths`` (tables and
    PNGs) to ``out/report.md``; returns the PNGs written."""
    out = Path(out)
    md, written = [], []
    for run in run_dirs_with_results(paths):
        records = read_records(run)
        if not records:
            continue
        name, rec = Path(run).name, records[-1]
        md += [f"## Long-context evaluation: {name} (steps {', '.join(str(r['step']) for r in records)})", ""]
        series = {f"step {r['step']} (trained at {r.get('trained_len')})": r["by_position"]
                  for r in records if r.get("by_position")}
        if series:
            png = plot_by_position(series, out / f"long_eval_{name}.png", records[0].get("trained_len"),
                                   f"{name}: held-out loss by position, every evaluation")
            md += [by_position_table(series), "", f"![{name}]({png.name})", ""]
            written.append(png)
        if rec.get("passkey"):
            png = plot_passkey(rec["passkey"], out / f"passkey_{name}.png", f"{name} step {rec['step']}: passkey")
            md += [f"Passkey retrieval at step {rec['step']}:", "", passkey_table(rec["passkey"]), "",
                   f"![{name} passkey]({png.name})", ""]
            written.append(png)
    if md:
        with open(out / "report.md", "a") as f:
            f.write("\n" + "\n".join(md))
        _add_html(out / "report.html", written)
    return written


def _add_html(path: Path, pngs):
    """The PNGs, embedded, at the end of ``report.html`` (when the report wrote one)."""
    import base64

    if not path.is_file():
        return
    imgs = "".join(f'<h3>{p.stem}</h3><img alt="{p.stem}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}"/>' for p in pngs)
    text = path.read_text()
    path.write_text(text.replace("</body>", f"<h2>Long-context evaluation</h2>{imgs}</body>", 1))
