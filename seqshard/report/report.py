"""Scaling report from run folders: one table row per run, efficiency against the smallest run.

A run folder is a ``train.output_dir``: ``metrics.jsonl`` plus ``run.json`` (``world_size`` and
``spec``, written by ``seqshard sweep``) or ``spec.yaml``. Every figure is recomputable from
``metrics.jsonl`` (the first step, warmup, is left out when there are at least two):

- throughput ``X = sum(tokens) / sum(step_time_s)``; per device ``X / W`` (W = world size);
- strong scaling (same global batch ``data.tokens_per_step``, more devices), against the
  smallest run ``b`` of the same series: ``eff = (t_b * W_b) / (t_W * W)`` with ``t`` the mean
  step time; ideal 1.0 means W devices are W/W_b times faster;
- weak scaling (same tokens per device, batch grows with W): ``eff = t_b / t_W``;
- model FLOPs per step (training = forward + backward = 3 x forward; a matmul of an ``m x n``
  weight costs ``2 m n`` FLOPs per token forward)::

      F = 6 * N * T                                 dense layers, N = matmul parameters
        + 6 * d * sum_i L_i^2 * n_softmax_layers    causal attention (QK^T and PV)
        + 12 * d * d_head * T * n_linear_layers     linear attention (state update and readout)

  ``N`` counts q/k/v/o, the SwiGLU MLP and the LM head (embedding lookups cost no FLOPs);
  ``T`` is the step's tokens; ``L_i`` are the attention segments (documents or pieces): the
  ``attention_flops`` metric is ``2 * sum_i L_i^2``. Causal masking halves the
  ``12 * n_layers * d * sum L_i^2`` of full attention (PaLM, Chowdhery et al. 2022, App. B);
- MFU = ``F / t / W / peak`` with the per-device peak FLOP/s of a hardware profile or
  ``--peak-tflops``;
- communication fraction = ``sum(comm_time_s) / sum(step_time_s)`` (rank 0's collectives);
- peak memory = max ``peak_mem_mb`` (rank 0; on CPU the process's max RSS).
"""
from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from seqshard.train.logs import read_metrics
from seqshard.launch.spec import Spec, SpecError, from_dict

# Keys that say *where* a run ran, not *what* it trained: excluded from the config identity.
_PLACE_KEYS = ("launch.", "train.output_dir", "parallel.sp", "data.tokens_per_step")

COLUMNS = [  # (row key, header, format)
    ("name", "run", "{}"), ("config", "config", "{}"), ("world", "devices", "{}"),
    ("layout", "dp x sp", "{}"), ("tokens_per_step", "tokens/step", "{}"), ("steps", "steps", "{}"),
    ("step_time_s", "step time (s)", "{:.4g}"), ("tokens_per_s", "tokens/s", "{:.4g}"),
    ("tokens_per_s_per_device", "tokens/s/device", "{:.4g}"), ("strong_eff", "strong eff", "{:.3f}"),
    ("weak_eff", "weak eff", "{:.3f}"), ("tflops_per_device", "TFLOP/s/device", "{:.4g}"),
    ("mfu", "MFU", "{:.2%}"), ("comm_fraction", "comm fraction", "{:.3f}"),
    ("peak_mem_mb", "peak mem (MB)", "{:.0f}"), ("loss", "loss first -> last", "{}"),
]


class ReportError(ValueError):
    """A run folder the report cannot read; the message names the folder."""


@dataclass
class RunData:
    path: Path
    spec: Spec
    world_size: int
    metrics: list[dict]


def matmul_params(model) -> int:
    """Parameters that multiply activations: attention q/k/v/o, SwiGLU w1/w2/w3, LM head."""
    kv = model.n_kv_heads * model.head_dim
    attn = 2 * model.dim * model.dim + 2 * model.dim * kv
    mlp = 3 * model.dim * model.ffn_dim
    return model.n_layers * (attn + mlp) + model.dim * model.vocab_size


def layer_counts(model) -> tuple[int, int]:
    """(softmax layers, linear-attention layers)."""
    if model.arch == "llama":
        return model.n_layers, 0
    if model.arch == "linear_llama":
        return 0, model.n_layers
    return model.layer_pattern.count("A"), model.layer_pattern.count("L")


def model_flops(model, tokens: int, sum_sq_len: float) -> float:
    """Training FLOPs (forward + backward) of one step of ``tokens`` tokens; see the module doc."""
    softmax, linear = layer_counts(model)
    return (6.0 * matmul_params(model) * tokens + 6.0 * model.dim * sum_sq_len * softmax
            + 12.0 * model.dim * model.head_dim * tokens * linear)


def step_sum_sq(metrics_row: dict, spec: Spec) -> float:
    """``sum_i L_i^2`` of a step: from ``attention_flops``, else full windows (an upper bound)."""
    if "attention_flops" in metrics_row:
        return metrics_row["attention_flops"] / 2
    return metrics_row["tokens"] * spec.data.max_seq_len


def load_run(path) -> RunData:
    path = Path(path)
    metrics = read_metrics(path)
    if not metrics:
        raise ReportError(f"{path}: no steps in metrics.jsonl")
    info = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}
    raw = info.get("spec")
    if raw is None and (path / "spec.yaml").is_file():
        raw = yaml.safe_load((path / "spec.yaml").read_text())
    if raw is None or "world_size" not in info:
        raise ReportError(f"{path}: needs run.json with world_size and spec (seqshard sweep writes it)")
    try:
        spec = from_dict(raw, info["world_size"])
    except SpecError as err:
        raise ReportError(f"{path}: its spec is invalid: {err}") from None
    return RunData(path, spec, int(info["world_size"]), metrics)


def find_runs(paths) -> list[RunData]:
    """Every run folder (a folder with ``metrics.jsonl``) at or under each path, in path order."""
    folders = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such folder")
        found = [p] if (p / "metrics.jsonl").is_file() else sorted(m.parent for m in p.rglob("metrics.jsonl"))
        if not found:
            raise ReportError(f"{p}: no run folders (a metrics.jsonl) under it")
        folders += [f for f in found if f not in folders]
    return [load_run(f) for f in folders]


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _identity(spec: Spec) -> dict:
    return {k: v for k, v in _flat(spec.to_dict()).items() if not k.startswith(_PLACE_KEYS)}


def sp_class(sp: int, world: int) -> str:
    """How a run uses its devices: ``dp`` (sp 1), ``sp=all`` (sp = world) or ``sp=<n>``."""
    return "dp" if sp == 1 else "sp=all" if sp == world else f"sp={sp}"


def summarize(run: RunData, peak_tflops: float | None = None) -> dict:
    """One table row of a run (module doc formulas); the first step is left out when possible."""
    m = run.metrics
    steps = m[1:] if len(m) > 1 else m
    seconds = sum(s["step_time_s"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    flops = sum(model_flops(run.spec.model, s["tokens"], step_sum_sq(s, run.spec)) for s in steps)
    w, sp = run.world_size, run.spec.parallel.sp
    tflops = flops / seconds / w / 1e12
    return {"name": run.path.name, "path": str(run.path), "world": w, "dp": run.spec.dp(w), "sp": sp,
            "sp_method": run.spec.parallel.sp_method, "layout": f"{run.spec.dp(w)} x {sp}",
            "tokens_per_step": run.spec.data.tokens_per_step, "steps": len(steps),
            "step_time_s": seconds / len(steps), "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_device": tokens / seconds / w, "tflops_per_device": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None,
            "comm_fraction": sum(s.get("comm_time_s", 0.0) for s in steps) / seconds,
            "peak_mem_mb": max(s["peak_mem_mb"] for s in m),
            "loss": f"{m[0]['loss']:.3f} -> {m[-1]['loss']:.3f}", "sp_class": sp_class(sp, w)}


def label_configs(runs: list[RunData], rows: list[dict]) -> None:
    """Set ``row["config"]`` to the identity keys that differ between runs (or the spec name),
    and ``row["group"]`` to the identity the scaling series are formed within."""
    ids = [_identity(r.spec) for r in runs]
    varying = sorted({k for i in ids for k in i if any(j.get(k) != i.get(k) for j in ids)})
    for run, ident, row in zip(runs, ids, rows):
        row["config"] = " ".join(f"{k.split('.')[-1]}={ident[k]}" for k in varying) or run.spec.name
        row["group"] = json.dumps(ident, sort_keys=True)


def add_scaling(rows: list[dict]) -> None:
    """Add ``strong_eff`` / ``weak_eff`` (module doc) to rows with ``group``, ``sp_class``,
    ``world``, ``tokens_per_step`` and ``step_time_s``, and the names of the series each row is
    on (``strong_series``, ``weak_series``: lists, for the plots).

    A one-device run (necessarily sp 1) is the baseline of every layout of its group."""
    classes = defaultdict(set)
    for r in rows:
        classes[r["group"]].add(r["sp_class"])
    strong, weak = defaultdict(list), defaultdict(list)
    for r in rows:
        r["strong_eff"] = r["weak_eff"] = None
        r["strong_series"], r["weak_series"] = [], []
        for cls in sorted(classes[r["group"]]) if r["world"] == 1 else [r["sp_class"]]:
            head = f"{r['config']} {cls}" if r["world"] == 1 else f"{r['config']} {r['sp_class']}"
            strong[(r["group"], cls, r["tokens_per_step"])].append((r, f"{head} T={r['tokens_per_step']}"))
            per_dev = r["tokens_per_step"] / r["world"]
            weak[(r["group"], cls, per_dev)].append((r, f"{head} T/dev={per_dev:g}"))
    for members, key, strong_scaling in ((strong, "strong_eff", True), (weak, "weak_eff", False)):
        for series in members.values():
            for r, name in series:
                r[key.replace("eff", "series")].append(name)
            if len({r["world"] for r, _ in series}) < 2:
                continue
            base = min((r for r, _ in series), key=lambda r: r["world"])
            for r, _ in series:
                ratio = base["step_time_s"] / r["step_time_s"]
                r[key] = ratio * base["world"] / r["world"] if strong_scaling else ratio


def collect(paths, peak_tflops: float | None = None) -> list[dict]:
    """Rows for every run folder under ``paths``, sorted by config then devices."""
    runs = find_runs(paths)
    rows = [summarize(r, peak_tflops) for r in runs]
    label_configs(runs, rows)
    add_scaling(rows)
    return sorted(rows, key=lambda r: (r["config"], r["sp_class"], r["tokens_per_step"], r["world"]))


def fmt(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    return "-" if value is None else spec.format(value)


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r, k, f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(rows, columns=COLUMNS) -> str:
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r, k, f))}</td>" for k, _, f in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PLOTS = [  # (file stem, title, row key, y label, which series)
    ("throughput", "Throughput", "tokens_per_s", "tokens/s", "strong_series"),
    ("throughput_per_device", "Throughput per device", "tokens_per_s_per_device", "tokens/s/device",
     "strong_series"),
    ("strong_scaling", "Strong scaling efficiency (same global batch)", "strong_eff", "efficiency",
     "strong_series"),
    ("weak_scaling", "Weak scaling efficiency (same tokens per device)", "weak_eff", "efficiency",
     "weak_series"),
    ("mfu", "Model FLOPs utilization", "mfu", "MFU", "strong_series"),
    ("tflops", "Model TFLOP/s per device", "tflops_per_device", "TFLOP/s/device", "strong_series"),
    ("comm_fraction", "Communication fraction of step time", "comm_fraction", "comm / step time",
     "strong_series"),
    ("peak_memory", "Peak memory per device", "peak_mem_mb", "MB", "strong_series"),
]


def _draw(rows, stem, title, key, ylabel, series_key, out: Path, predicted: bool) -> Path | None:
    """One PNG: ``key`` against devices, a line per series, a panel per ``row["panel"]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return None
    panels = list(dict.fromkeys(r.get("panel", "") for r in rows))  # in row order
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols + 2.5, 3.6 * nrows + 0.4), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    names = sorted({name for r in rows for name in r[series_key]})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    color = {name: cmap(i % cmap.N) for i, name in enumerate(names)}  # one colour per series everywhere
    handles = {}
    for ax, panel in zip(axes.flat, panels):
        members = defaultdict(list)
        for r in rows:
            if r.get("panel", "") == panel:
                for name in r[series_key]:
                    members[name].append(r)
        for name, pts in sorted(members.items()):
            pts = sorted(pts, key=lambda r: r["world"])
            handles[name], = ax.plot([r["world"] for r in pts], [r[key] for r in pts], marker="o", label=name,
                                     color=color[name])
        worlds = sorted({r["world"] for r in rows if r.get("panel", "") == panel})
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("devices")
        ax.set_ylabel(ylabel)
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend([handles[n] for n in names], names, fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(("PREDICTED: " if predicted else "") + title, fontsize=11)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw_all(rows: list[dict], out: Path, predicted: bool = False) -> dict:
    """Every plot of :data:`PLOTS` that has data; ``{title: png path}``."""
    drawn = {}
    for stem, title, key, ylabel, series_key in PLOTS:
        if key == "tflops_per_device" and any(r.get("mfu") is not None for r in rows):
            continue  # MFU already shows it, normalized
        path = _draw(rows, stem, title, key, ylabel, series_key, out, predicted)
        if path:
            drawn[title] = path
    return drawn


def write_report(rows: list[dict], out, title: str, notes: list[str], columns=COLUMNS) -> dict:
    """``report.md``, ``report.html`` (plots embedded as base64 PNG), the PNGs and
    ``report.json`` (the rows) into ``out``; returns ``{name: path}`` of what it wrote."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = draw_all(rows, out, predicted="PREDICTED" in title)
    md = [f"# {title}", "", *[f"- {n}" for n in notes], "", markdown_table(rows, columns), ""]
    md += [f"![{name}]({p.name})" for name, p in pngs.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    imgs = "".join(f'<h3>{html.escape(n)}</h3><img alt="{html.escape(n)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}"/>' for n, p in pngs.items())
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}img{max-width:900px;display:block}"
        f"</style></head><body><h1>{html.escape(title)}</h1><ul>{notes_html}</ul>"
        f"{_html_table(rows, columns)}{imgs}</body></html>\n")
    (out / "report.json").write_text(json.dumps({"title": title, "notes": notes, "rows": rows}, indent=1))
    return {"report.md": out / "report.md", "report.html": out / "report.html",
            "report.json": out / "report.json", **{p.name: p for p in pngs.values()}}
