"""The report's recommendation: which configuration to train ``--tokens`` tokens with.

Candidates are the measured runs, plus PREDICTED points past the largest measured world size
(2x and 4x, for each measured series: the same global batch and the same tokens per device),
predicted by :func:`seqshard.report.simulate.predict` with a profile fitted to these very runs
(:func:`~seqshard.report.simulate.fit_profile`). Each candidate is labelled measured or PREDICTED.

- efficiency = tokens/s per device / the 1-device run's tokens/s per device (same model; for
  PREDICTED points, the predicted 1-device figure, so a prediction is judged against its own
  baseline);
- time to train = tokens / tokens/s; cost = time x devices (device-hours).

Among the candidates with efficiency >= ``min_efficiency``: the fastest (least time) and the
cheapest (fewest device-hours).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from . import report, simulate

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_tokens(text: str) -> float:
    """``2B`` -> 2e9, ``500M``, ``1e10``, ``123456``; decimal suffixes K M B/G T."""
    t = text.strip().upper()
    try:
        return float(t[:-1]) * _SUFFIX[t[-1]] if t and t[-1] in _SUFFIX else float(t)
    except ValueError:
        raise report.ReportError(f"--tokens: {text!r} is not a token count (e.g. 2B, 500M, 1e10)") from None


def _hours(tokens: float, tokens_per_s: float) -> float:
    return tokens / tokens_per_s / 3600


def _predicted(runs, rows, profile) -> list[dict]:
    """PREDICTED rows at 2x and 4x the largest measured world of each group."""
    by_group = defaultdict(list)
    for run, row in zip(runs, rows):
        by_group[row["group"]].append((run, row))
    out = []
    for group, members in by_group.items():
        top = max(r["world"] for _, r in members)
        base_run, base_row = min(members, key=lambda m: (m[1]["world"], -m[1]["tokens_per_step"]))
        seen = set()
        for run, row in members:
            steps = run.metrics[1:] if len(run.metrics) > 1 else run.metrics
            sq_per_token = sum(report.step_sum_sq(s, run.spec) for s in steps) / sum(s["tokens"] for s in steps)
            per_dev = row["tokens_per_step"] / row["world"]
            for world in (2 * top, 4 * top):
                for tokens in (row["tokens_per_step"], int(per_dev * world)):
                    if (world, tokens) in seen or tokens % (run.spec.data.max_seq_len * world):
                        continue
                    seen.add((world, tokens))
                    lay = simulate.Layout("none", world, tokens, sq_per_token * tokens, 1, 1,
                                          simulate.wire_bytes(run.spec))
                    pred = simulate.predict(run.spec.model, lay, profile, **simulate._engine(run.spec))
                    out.append({"group": group, "world": world, "layout": f"{world} x 1", "tokens_per_step": tokens,
                                "tokens_per_s": pred["tokens_per_s"], "source": "PREDICTED",
                                "per_device": pred["tokens_per_s_per_device"], "config": row["config"]})
        one = simulate.predict(base_run.spec.model, simulate.Layout(
            "none", 1, base_row["tokens_per_step"], sq_per_token * base_row["tokens_per_step"], 1, 1,
            simulate.wire_bytes(base_run.spec)), profile, **simulate._engine(base_run.spec))
        for r in out:
            if r["group"] == group:
                r["efficiency"] = r["per_device"] / one["tokens_per_s_per_device"]
    return out


def candidates(paths, rows: list[dict], predict: bool = True) -> list[dict]:
    """Measured rows (with efficiency) and PREDICTED rows, for the recommendation."""
    runs = report.find_runs([r["path"] for r in rows])
    by_path = {str(run.path): run for run in runs}
    runs = [by_path[r["path"]] for r in rows]
    base = {}
    for r in rows:
        if r["world"] == 1:
            base[r["group"]] = max(base.get(r["group"], 0.0), r["tokens_per_s_per_device"])
    out = [{"group": r["group"], "world": r["world"], "layout": r["layout"], "tokens_per_step": r["tokens_per_step"],
            "tokens_per_s": r["tokens_per_s"], "source": "measured", "config": r["config"],
            "efficiency": r["tokens_per_s_per_device"] / base[r["group"]] if r["group"] in base else None}
           for r in rows]
    if predict and any(r["world"] == 1 for r in rows) and any(r["world"] > 1 for r in rows):
        out += _predicted(runs, rows, simulate.fit_profile(runs))
    return out


def recommend(cands: list[dict], tokens: float, min_efficiency: float) -> dict:
    for c in cands:
        c["hours"] = _hours(tokens, c["tokens_per_s"])
        c["device_hours"] = c["hours"] * c["world"]
        c["meets"] = c["efficiency"] is not None and c["efficiency"] >= min_efficiency
    ok = [c for c in cands if c["meets"]]
    return {"tokens": tokens, "min_efficiency": min_efficiency, "candidates": cands,
            "fastest": min(ok, key=lambda c: (c["hours"], c["device_hours"])) if ok else None,
            "cheapest": min(ok, key=lambda c: (c["device_hours"], c["hours"])) if ok else None}


def _describe(c: dict) -> str:
    return (f"{c['world']} devices ({c['layout']}, {c['tokens_per_step']} tokens/step, {c['config']}), "
            f"{c['source']}: {c['tokens_per_s']:.4g} tokens/s, efficiency {c['efficiency']:.2f}, "
            f"{c['hours']:.3g} h, {c['device_hours']:.3g} device-hours")


def section_markdown(rec: dict, png: str | None) -> str:
    lines = [f"## Recommendation for {rec['tokens']:.4g} tokens (efficiency >= {rec['min_efficiency']:g})", ""]
    if rec["fastest"] is None:
        lines += [f"No configuration reaches efficiency {rec['min_efficiency']:g}; lower --min-efficiency.", ""]
    else:
        lines += [f"- **fastest**: {_describe(rec['fastest'])}", f"- **cheapest**: {_describe(rec['cheapest'])}", ""]
    lines += ["| source | devices | dp x sp | tokens/step | tokens/s | efficiency | hours | device-hours | meets |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(rec["candidates"], key=lambda c: (c["source"] != "measured", c["tokens_per_step"], c["world"])):
        eff = "-" if c["efficiency"] is None else f"{c['efficiency']:.2f}"
        lines.append(f"| {c['source']} | {c['world']} | {c['layout']} | {c['tokens_per_step']} | "
                     f"{c['tokens_per_s']:.4g} | {eff} | {c['hours']:.3g} | {c['device_hours']:.3g} | "
                     f"{'yes' if c['meets'] else 'no'} |")
    lines += ["", "efficiency = tokens/s per device / the 1-device run's (PREDICTED rows: against the predicted "
              "1-device figure); PREDICTED = cost model (seqshard simulate) with a profile fitted to these runs."]
    if png:
        lines += ["", f"![recommendation]({png})"]
    return "\n".join(lines) + "\n"


def draw(rec: dict, out: Path) -> Path | None:
    """Efficiency against devices, measured (solid) and PREDICTED (hollow), with the threshold line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [c for c in rec["candidates"] if c["efficiency"] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    series = defaultdict(list)
    for c in pts:
        series[(c["tokens_per_step"] if c["source"] == "measured" else c["tokens_per_step"], c["source"])].append(c)
    for (tokens, source), cs in sorted(series.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cs = sorted(cs, key=lambda c: c["world"])
        ax.plot([c["world"] for c in cs], [c["efficiency"] for c in cs], marker="o", linestyle="-" if
                source == "measured" else "--", fillstyle="full" if source == "measured" else "none",
                label=f"{source} T={tokens}")
    ax.axhline(rec["min_efficiency"], color="red", linewidth=1, label=f"threshold {rec['min_efficiency']:g}")
    for key, marker in (("fastest", "*"), ("cheapest", "D")):
        if rec[key]:
            ax.plot([rec[key]["world"]], [rec[key]["efficiency"]], marker, markersize=12, color="black",
                    fillstyle="none", label=key)
    worlds = sorted({c["world"] for c in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(worlds, [str(w) for w in worlds])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("devices")
    ax.set_ylabel("efficiency (per-device tokens/s vs 1 device)")
    ax.set_title(f"Efficiency and the {rec['min_efficiency']:g} threshold (dashed: PREDICTED)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(out) / "recommendation.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def add_to_report(out, rows: list[dict], tokens: float, min_efficiency: float) -> dict:
    """Compute the recommendation and put its section into report.md / report.html / report.json."""
    import base64
    import html
    import json

    out = Path(out)
    rec = recommend(candidates(None, rows), tokens, min_efficiency)
    png = draw(rec, out)
    section = section_markdown(rec, png.name if png else None)
    md = (out / "report.md").read_text()
    cut = md.find("\n![")
    (out / "report.md").write_text(md[:cut + 1] + section + md[cut:] if cut >= 0 else md + "\n" + section)
    page = (out / "report.html").read_text()
    body = "<h2>" + html.escape(section.splitlines()[0][3:]) + "</h2><pre>" + html.escape(
        "\n".join(section.splitlines()[2:])) + "</pre>"
    if png:
        body += f'<img alt="recommendation" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"/>'
    (out / "report.html").write_text(page.replace("<h3>", body + "<h3>", 1) if "<h3>" in page
                                     else page.replace("</body>", body + "</body>"))
    data = json.loads((out / "report.json").read_text())
    data["recommendation"] = rec
    (out / "report.json").write_text(json.dumps(data, indent=1))
    return {"section": section, "png": png, **rec}
