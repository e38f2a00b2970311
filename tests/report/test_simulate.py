"""``seqshard simulate``: the analytic model's terms, a 1024-device report in seconds, calibration."""
import argparse
import json
import time

import pytest
import yaml

from seqshard.report import report, simulate
from seqshard.report.cli import register
from seqshard.parallel import memory_model as mm
from seqshard.report.simulate import Layout, predict
from seqshard.launch.spec import from_dict, load_spec
from seqshard.parallel.cost_model import CostModel
from seqshard.parallel.hardware import HardwareProfile
from tests.helpers.training import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REL = 1e-12
# One node, no latency, round numbers: every term below is checked by hand.
FLAT = HardwareProfile("flat", peak_flops=100e12, mfu=1.0, intra_node_bw=100e9, inter_node_bw=10e9,
                       devices_per_node=8, memory_bytes=80 * 2**30, collective_latency_s=0.0)
BIG = {"name": "big", "model": {"arch": "llama", "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                                "ffn_dim": 14336, "vocab_size": 128256},
       "data": {"max_seq_len": 32768, "tokens_per_step": 4194304},
       "parallel": {"sp": 8, "sp_method": "ulysses"},
       "train": {"dtype": "bfloat16", "engine": "deepspeed", "zero_stage": 3},
       "launch": {"launcher": "slurm", "nproc_per_node": 8, "nnodes": 128}}


def _cli(argv):
    ap = argparse.ArgumentParser()
    handlers = register(ap.add_subparsers(dest="command"))
    args = ap.parse_args(argv)
    return handlers[args.command](args)


@pytest.fixture
def model():
    return from_dict(BIG, 1024).model


def _sp_seconds(model, method, sp, n, ulysses=1):
    """Predicted seconds minus compute and gradient all-reduce: the SP term alone."""
    lay = Layout(method, sp, n * sp, float(n * sp) ** 2, sp, ulysses)
    pred = predict(model, lay, FLAT)
    grads = 2 * (sp - 1) / sp * report.matmul_params(model) * 2 / 100e9
    return pred["step_time_s"] - pred["compute_s"] - grads, pred


def test_communication_terms_by_hand(model):
    n, d, dkv, layers, bw = 4096, 4096, 8 * 128, 32, 100e9
    ulysses, _ = _sp_seconds(model, "ulysses", 4, n)
    assert ulysses == pytest.approx(2 * layers * n * (2 * d + 2 * dkv) * 2 * 3 / 4 / bw, rel=1e-9)
    allgather, _ = _sp_seconds(model, "allgather", 4, n)
    assert allgather == pytest.approx(2 * layers * 3 * 2 * n * dkv * 2 / bw, rel=1e-9)
    lasp2, _ = _sp_seconds(model, "lasp2", 4, n)
    assert lasp2 == pytest.approx(2 * layers * 3 * d * 128 * 2 / bw, rel=1e-9)
    lasp2_long, _ = _sp_seconds(model, "lasp2", 4, 16 * n)
    assert lasp2_long == pytest.approx(lasp2, rel=1e-9)  # the state does not grow with the sequence
    for tokens, hidden in ((n, True), (256, False)):  # 16K tokens of attention hide the hops, 1K do not
        ring, _ = _sp_seconds(model, "ring", 4, tokens)
        attn_layer = 6 * d * float(4 * tokens) ** 2 / 4 / 100e12
        hops = 3 * 3 * 2 * tokens * dkv * 2 / bw
        assert (hops < attn_layer) == hidden
        assert ring == pytest.approx(layers * max(0.0, hops - attn_layer), rel=1e-6, abs=1e-12)


def test_ulysses_term_matches_the_planner_cost_model_for_full_heads():
    """With as many K/V heads as heads, our all-to-all volume is the planner's (cost_model.py)."""
    mha = from_dict({**BIG, "model": {**BIG["model"], "n_kv_heads": 32}}, 1024).model
    for sp, n in ((2, 1024), (8, 4096)):
        ours, _ = _sp_seconds(mha, "ulysses", sp, n)
        cm = CostModel.from_model_config(mha, FLAT)
        assert ours == pytest.approx(cm.comm_bytes(n * sp, sp) / FLAT.intra_node_bw, rel=1e-9)


def test_compute_memory_and_mfu(model):
    lay = Layout("ulysses", 8, 8 * 8192, 8 * 8192.0 ** 2, 8)
    pred = predict(model, lay, FLAT, zero_stage=3)
    flops = report.model_flops(model, 8 * 8192, 8 * 8192.0 ** 2)
    assert pred["compute_s"] == pytest.approx(flops / 8 / 100e12, rel=REL)
    assert pred["mfu"] == pytest.approx(flops / pred["step_time_s"] / 8 / 100e12, rel=REL)
    c = mm.MemoryConfig(sp=8, sp_method="ulysses", dp=8, zero_stage=3, act_bytes=2, param_bytes=2, device="cuda")
    assert pred["peak_mem_mb"] == pytest.approx(mm.predict_peak(model, 8 * 8192, c)["total"] / 2 ** 20, rel=REL)
    # the spec's knobs reach the memory model: full checkpointing holds less than none
    full = predict(model, lay, FLAT, zero_stage=3, memory=mm.MemoryConfig(checkpointing="full"))
    assert full["peak_mem_mb"] < pred["peak_mem_mb"]
    dp = Layout("ulysses", 8, 8 * 8192, 8 * 8192.0 ** 2, 1)  # pure data parallel: only gradients move
    grads = 2 * 7 / 8 * report.matmul_params(model) * 2 / 100e9
    serial, overlapped = predict(model, dp, FLAT), predict(model, dp, FLAT, overlap_grads=True)
    assert serial["step_time_s"] == pytest.approx(serial["compute_s"] + grads, rel=REL)
    hidden = max(0.0, grads - 2 / 3 * serial["compute_s"])
    assert overlapped["step_time_s"] == pytest.approx(serial["compute_s"] + hidden, rel=REL)
    zero0 = predict(model, lay, FLAT, zero_stage=0)["peak_mem_mb"]
    assert zero0 - pred["peak_mem_mb"] == pytest.approx(16 * mm.n_params(model) * (1 - 1 / 8) / 2 ** 20, rel=REL)


def test_layouts_follow_the_load(model):
    assert simulate.layout("ring", model, 64, 2 ** 20, 8192, FLAT).sp == 64  # one 1M sequence on 64 devices
    assert simulate.layout("ring", model, 1024, 2 ** 20, 8192, FLAT).sp == 128  # 8 sequences of 128
    assert simulate.layout("ulysses", model, 1024, 2 ** 20, 8192, FLAT).startswith("ulysses: sp 128")
    usp = simulate.layout("usp", model, 1024, 2 ** 20, 8192, FLAT)
    assert (usp.sp, usp.ulysses) == (128, 8)  # ulysses inside the 8-device node, ring across nodes


def test_1024_device_report_in_under_10s(tmp_path, capsys):
    spec_path = tmp_path / "big.yaml"
    spec_path.write_text(yaml.safe_dump(BIG))
    assert load_spec(spec_path).world_size == 1024
    out = tmp_path / "sim"
    start = time.perf_counter()
    rc = _cli(["simulate", str(spec_path), "--devices", "8,64,512,1024", "--seq-len", "32K,256K,1M,4M",
               "--profile", "h100_nvlink_ib400", "--out", str(out)])
    assert rc == 0 and time.perf_counter() - start < 10.0
    md = (out / "report.md").read_text()
    assert md.startswith("# seqshard scaling report (PREDICTED)")
    rows = json.loads((out / "report.json").read_text())["rows"]
    names = {r["name"] for r in rows}
    for method in simulate.METHODS:
        assert (f"{method} P=1024 L=4M" in names) == (method not in ("ulysses", "adaptive")), method
        assert f"| {method} P=8 L=32K | {method} | 8 |" in md
    assert "points not possible, e.g. ulysses: sp 64 does not divide 32 heads (P=64, L=1M)" in md
    assert "points not possible, e.g. adaptive: sequence 0 of length 262144 does not fit" in md
    by_name = {r["name"]: r for r in rows}
    both = [n for n in names if n.startswith("adaptive") and n.replace("adaptive", "ulysses") in names]
    assert len(both) >= 6  # uniform lengths: the planner's groups are the static ulysses groups
    for n in both:
        assert by_name[n]["step_time_s"] == pytest.approx(by_name[n.replace("adaptive", "ulysses")]["step_time_s"])
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 6
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10000, (p, len(data))
    assert "PREDICTED" in (out / "report.html").read_text()


def _fake_run(folder, world, metrics):
    folder.mkdir(parents=True)
    spec = load_spec(ROOT / "examples" / "sweep.yaml", [f"launch.nproc_per_node={world}"])
    (folder / "run.json").write_text(json.dumps({"world_size": world, "spec": spec.to_dict()}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return spec


def test_calibration_fits_the_measured_rate_and_bandwidth(tmp_path, capsys):
    """Hand-made metrics with a known FLOP rate (1 rank) and collective bandwidth (2 ranks)."""
    def step(i, seconds, comm_bytes=0, comm_s=0.0):
        return {"step": i, "loss": 5.0 - i, "tokens": 2048, "attention_flops": 2 * 4 * 512 ** 2,
                "step_time_s": seconds, "compute_time_s": seconds - comm_s, "comm_bytes": comm_bytes,
                "comm_time_s": comm_s, "peak_mem_mb": 500.0}
    spec = _fake_run(tmp_path / "runs" / "w1", 1, [step(i, 0.5 if i == 1 else 0.2) for i in (1, 2, 3)])
    _fake_run(tmp_path / "runs" / "w2", 2, [step(i, 0.2, 4_000_000, 0.05) for i in (1, 2, 3)])
    out = tmp_path / "sim"
    assert _cli(["simulate", str(ROOT / "examples" / "sweep.yaml"), "--devices", "8", "--seq-len", "32K",
                 "--out", str(out), "--calibrate-from", str(tmp_path / "runs")]) == 0
    flops = report.model_flops(spec.model, 2048, 4 * 512 ** 2)
    fitted = simulate.fit_profile(report.find_runs([tmp_path / "runs"]))
    assert fitted.peak_flops == pytest.approx(flops / 0.2, rel=REL)
    assert fitted.intra_node_bw == pytest.approx(2 * 1 / 2 * 4_000_000 / 0.05, rel=REL)
    rows = {r["name"]: r for r in json.loads((out / "calibration" / "report.json").read_text())["rows"]}
    assert set(rows) == {f"w{w} {kind}" for w in (1, 2) for kind in
                         ("measured", "PREDICTED cpu_gloo", "PREDICTED fitted")}
    assert rows["w1 PREDICTED fitted"]["ratio"] == pytest.approx(1.0, rel=1e-9)  # the fit reproduces its data
    n = report.matmul_params(spec.model)
    expected_w2 = flops / 2 / (flops / 0.2) + 2 * 1 / 2 * n * 4 / fitted.intra_node_bw
    assert rows["w2 PREDICTED fitted"]["step_time_s"] == pytest.approx(expected_w2, rel=1e-9)
    assert rows["w2 measured"]["step_time_s"] == pytest.approx(0.2, rel=REL)
    assert "| w2 PREDICTED cpu_gloo |" in (out / "calibration" / "report.md").read_text()


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    spec = str(ROOT / "examples" / "sweep.yaml")
    for argv, msg in ((["--seq-len", "32Q"], "--seq-len: '32Q' is not a size"),
                      (["--methods", "ulysses,magic"], "--methods: unknown magic"),
                      (["--profile", "tpu9"], "--profile: unknown hardware profile 'tpu9'")):
        assert _cli(["simulate", spec, "--out", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
