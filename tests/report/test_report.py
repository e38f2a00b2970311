"""``seqshard report`` from real runs: every figure recomputed here from ``metrics.jsonl``."""
import argparse
import json
import re

import pytest

from seqshard.report import report
from seqshard.report.cli import register
from tests.helpers.ranks import run_ranks
from tests.helpers.training import read_metrics, small_spec, train_rank

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REL = 1e-9  # the report and this test do the same float arithmetic in a different order
PEAK_TFLOPS = 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real runs: 1 rank and 2 ranks on the same batch (strong), 2 ranks on twice the
    batch (weak: same tokens per device as the 1-rank run)."""
    root = tmp_path_factory.mktemp("runs")
    for name, world, extra in (("w1", 1, []), ("w2", 2, []), ("w2_big", 2, ["data.tokens_per_step=2048"])):
        run_ranks(world, train_rank, str(root / name), extra)
    return root


def _measured(run_dir):
    """(mean step time, tokens/s, model FLOPs per step list) of the steps after the first."""
    steps = read_metrics(run_dir)[1:]
    seconds = sum(s["step_time_s"] for s in steps)
    return seconds / len(steps), sum(s["tokens"] for s in steps) / seconds, steps


def _matmul_params(spec):
    from seqshard.models import build_model

    model = build_model(spec.model)
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed"))


def test_trainer_leaves_a_self_describing_run_folder(runs):
    info = json.loads((runs / "w2" / "run.json").read_text())
    assert info["world_size"] == 2
    assert (runs / "w2" / "spec.yaml").is_file()


def test_efficiencies_and_mfu_recomputed_from_metrics(runs):
    rows = {r["name"]: r for r in report.collect([runs], PEAK_TFLOPS)}
    assert set(rows) == {"w1", "w2", "w2_big"}
    t1, x1, _ = _measured(runs / "w1")
    t2, x2, steps2 = _measured(runs / "w2")
    t2b, _, _ = _measured(runs / "w2_big")
    assert rows["w2"]["tokens_per_s"] == pytest.approx(x2, rel=REL)
    assert rows["w2"]["tokens_per_s_per_device"] == pytest.approx(x2 / 2, rel=REL)
    assert rows["w1"]["strong_eff"] == pytest.approx(1.0, rel=REL)
    assert rows["w2"]["strong_eff"] == pytest.approx(t1 * 1 / (t2 * 2), rel=REL)
    assert rows["w2_big"]["weak_eff"] == pytest.approx(t1 / t2b, rel=REL)
    assert rows["w2"]["weak_eff"] is None and rows["w2_big"]["strong_eff"] is None  # no partner run

    spec = small_spec("unused", 2)
    n, d, layers = _matmul_params(spec), spec.model.dim, spec.model.n_layers
    flops = sum(6 * n * s["tokens"] + 6 * d * layers * (s["attention_flops"] / 2) for s in steps2)
    seconds = sum(s["step_time_s"] for s in steps2)
    assert rows["w2"]["tflops_per_device"] == pytest.approx(flops / seconds / 2 / 1e12, rel=REL)
    assert rows["w2"]["mfu"] == pytest.approx(flops / seconds / 2 / 1e12 / PEAK_TFLOPS, rel=REL)
    comm = sum(s["comm_time_s"] for s in steps2) / seconds
    assert rows["w2"]["comm_fraction"] == pytest.approx(comm, rel=REL)
    assert 0 < comm < 1 and rows["w1"]["comm_fraction"] == 0.0  # one rank sends nothing
    assert rows["w2"]["peak_mem_mb"] == max(s["peak_mem_mb"] for s in read_metrics(runs / "w2"))


def test_attention_term_is_the_causal_half_of_full_attention():
    """One 1024-token document: 6 * d * L^2 per layer, half of the non-causal 12 * d * L^2."""
    spec = small_spec("unused", 1)
    m = spec.model
    with_attn = report.model_flops(m, 1024, 1024 ** 2)
    without = report.model_flops(m, 1024, 0)
    assert with_attn - without == pytest.approx(0.5 * 12 * m.n_layers * m.dim * 1024 ** 2, rel=1e-12)
    assert without == pytest.approx(6 * _matmul_params(spec) * 1024, rel=1e-12)


def test_report_files_table_and_plots(runs, tmp_path):
    ap = argparse.ArgumentParser()
    handlers = register(ap.add_subparsers(dest="command"))
    out = tmp_path / "report"
    args = ap.parse_args(["report", str(runs), "--out", str(out), "--peak-tflops", str(PEAK_TFLOPS)])
    assert handlers["report"](args) == 0
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} >= {"throughput", "throughput_per_device", "strong_scaling", "weak_scaling",
                                      "mfu", "comm_fraction", "peak_memory"}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, (p, len(data))
    md = (out / "report.md").read_text()
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    strong = f"{rows['w2']['strong_eff']:.3f}"
    assert re.search(rf"^\| w2 \|.*\| {re.escape(strong)} \|", md, re.M), md
    assert md.count("\n| w") == 3 and "| strong eff |" in md and "| MFU |" in md
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(pngs)


def test_folder_without_run_info_is_one_line_error(runs, tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "metrics.jsonl").write_text((runs / "w1" / "metrics.jsonl").read_text())
    with pytest.raises(report.ReportError, match=r"bare: needs run.json with world_size"):
        report.collect([tmp_path / "bare"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="empty: no run folders"):
        report.collect([tmp_path / "empty"])
    with pytest.raises(report.ReportError, match="missing: no such folder"):
        report.collect([tmp_path / "missing"])


def test_report_cli_bad_input_exits_2_with_one_line(runs, tmp_path, capsys):
    ap = argparse.ArgumentParser()
    handlers = register(ap.add_subparsers(dest="command"))
    for argv, msg in (([str(tmp_path / "nope")], "nope: no such folder"),
                      ([str(runs), "--profile", "tpu9"], "--profile: unknown hardware profile 'tpu9'")):
        args = ap.parse_args(["report", *argv, "--out", str(tmp_path / "out")])
        assert handlers["report"](args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err


def test_report_recommends_fastest_and_cheapest_for_a_token_target(runs, tmp_path):
    ap = argparse.ArgumentParser()
    handlers = register(ap.add_subparsers(dest="command"))
    out = tmp_path / "rec"
    args = ap.parse_args(["report", str(runs), "--out", str(out), "--tokens", "2B", "--min-efficiency", "0.3"])
    assert handlers["report"](args) == 0
    data = json.loads((out / "report.json").read_text())
    rec, rows = data["recommendation"], {r["path"]: r for r in data["rows"]}
    base = next(r for r in rows.values() if r["world"] == 1)["tokens_per_s_per_device"]
    measured = [c for c in rec["candidates"] if c["source"] == "measured"]
    assert len(measured) == 3 and {c["world"] for c in rec["candidates"] if c["source"] == "PREDICTED"} == {4, 8}
    for c in measured:  # efficiency and time recomputed from the rows
        row = next(r for r in rows.values() if r["world"] == c["world"] and r["tokens_per_step"] == c["tokens_per_step"])
        assert c["efficiency"] == pytest.approx(row["tokens_per_s_per_device"] / base, rel=REL)
        assert c["hours"] == pytest.approx(2e9 / row["tokens_per_s"] / 3600, rel=REL)
    ok = [c for c in rec["candidates"] if c["efficiency"] is not None and c["efficiency"] >= 0.3]
    assert rec["fastest"]["hours"] == min(c["hours"] for c in ok)
    assert rec["cheapest"]["device_hours"] == min(c["device_hours"] for c in ok)
    md = (out / "report.md").read_text()
    assert "## Recommendation for 2e+09 tokens (efficiency >= 0.3)" in md and "**fastest**" in md
    assert "| PREDICTED |" in md and "| measured |" in md and "![recommendation](recommendation.png)" in md
    assert (out / "recommendation.png").read_bytes()[:8] == PNG_MAGIC
    assert "Recommendation for" in (out / "report.html").read_text()
