import math

import numpy as np
import pytest

from seqshard.report.calibrate import calibrate
from seqshard.parallel.cost_model import CostModel
from seqshard.parallel.hardware import HardwareProfile, get_profile
from seqshard.models.config import ModelConfig


def test_calibrate_returns_positive_finite_profile():
    profile = calibrate()
    for key in ("peak_flops", "intra_node_bw", "inter_node_bw", "collective_latency_s", "memory_bytes"):
        assert math.isfinite(profile[key]) and profile[key] > 0, (key, profile[key])
    cm = CostModel.from_model_config(ModelConfig(), HardwareProfile(**profile), bytes_per_element=4)
    assert cm.time(4096, 2) > 0


def test_profiles_name_their_sources():
    for name in ("h100_nvlink_ib400", "a100_nvlink_ib200", "cpu_gloo"):
        assert get_profile(name).source


def test_calibration_file_from_another_machine_or_model_is_refused(tmp_path):
    import json

    import pytest

    from seqshard.report.calibrate import CalibrationError, load_calibration, save_profile

    profile = {**get_profile("cpu_gloo").__dict__, "bw_by_group_size": ()}
    model = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    path = tmp_path / "cal.json"
    save_profile(profile, path, model)
    assert load_calibration(path, model).peak_flops == profile["peak_flops"]  # same machine, same shape
    other = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    with pytest.raises(CalibrationError, match="calibrated for model shape .*dim.: 64.*recalibrate"):
        load_calibration(path, other)
    record = json.loads(path.read_text())
    record["machine"] = "cuda:NVIDIA H100 80GB HBM3 x8"
    path.write_text(json.dumps(record))
    with pytest.raises(CalibrationError, match="calibrated on 'cuda:NVIDIA H100.*this machine is 'cpu:"):
        load_calibration(path, model)


def test_compute_fit_from_the_model_itself():
    """Forward + backward of the model at several lengths: the fitted line (fixed cost per
    micro-batch + FLOPs / F) reproduces the measured times it was fitted on."""
    import numpy as np

    from seqshard.report.calibrate import measure_compute

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=192, vocab_size=256)
    fit = measure_compute(cfg, lengths=(64, 256, 512), repeat=3)
    assert fit["flops_per_s"] > 0 and fit["microbatch_overhead_s"] >= 0 and fit["adam_s"] > 0
    flops = CostModel.from_model_config(cfg, get_profile("cpu_gloo")).flops(np.array(fit["lengths"], float))
    predicted = fit["microbatch_overhead_s"] + flops / fit["flops_per_s"]
    # the longest length: where other jobs' noise is smallest relative to the time measured
    assert abs(predicted[-1] / fit["seconds"][-1] - 1) < 0.5, (predicted, fit["seconds"])


def test_cost_model_uses_the_fit_per_group_size():
    profile = get_profile("cpu_gloo").with_(latency_by_group_size=((2, 0.01),), bw_by_group_size=((2, 1e8),),
                                            microbatch_overhead_s=0.05, step_overhead_s=0.2)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=192)
    cm = CostModel.from_model_config(cfg, profile, bytes_per_element=4)
    assert cm.latency(2) == 0.01 and cm.link_bandwidth(2) == 1e8
    # Ulysses on 2: 8 all-to-alls per layer, each paying the size-2 latency
    assert cm.comm_time(1000, 2) >= 8 * 2 * 0.01
    one = cm.microbatch_time([300, 200], 1, "local")
    assert one == pytest.approx(float(cm.compute_time(300, 1) + cm.compute_time(200, 1)) + 0.05)
    # one packed micro-batch pays the collectives once, two documents priced apart pay twice
    apart = float(cm.method_time(300, 2, "ulysses") + cm.method_time(200, 2, "ulysses"))
    assert cm.microbatch_time([300, 200], 2, "ulysses") < apart + 0.05


@pytest.mark.slow  # spawns 2 processes, times micro-batches, then trains the spec three times
def test_calibrate_model_fits_group_sizes_one_and_two(tmp_path):
    from seqshard.launch.spec import load_spec
    from seqshard.parallel.hardware import get_profile as profile_of
    from seqshard.report.calibrate import calibrate_model, save_profile
    from tests.helpers.training import ROOT, SMALL

    sets = [*SMALL, "model.n_kv_heads=4", "train.steps=4"]
    cfg = load_spec(ROOT / "examples/tiny.yaml", sets).model
    profile = calibrate_model(cfg, spec_path=ROOT / "examples/tiny.yaml", overrides=sets, trainer_steps=4)
    assert profile["bw_by_group_size"][0][0] == 2 and profile["bw_by_group_size"][0][1] > 0
    assert profile["latency_by_group_size"][0][0] == 2 and profile["step_overhead_s"] > 0
    assert [f[:2] for f in profile["microbatch_fit"]] == [(1, "local"), (2, "ulysses"), (2, "ring")]
    trainer = profile["measured"]["trainer_fit"]
    assert [r["method"] for r in trainer["runs"]] == ["local", "ulysses", "ring", "adaptive"]
    for run in trainer["runs"][:3]:  # 3 steps each after the first, every one measured and predicted
        assert len(run["slowest_micro_batch_s"]) == len(run["predicted_s"]) == 3 and run["scale"] > 0
    adaptive = trainer["runs"][3]
    assert len(adaptive["step_s"]) == len(adaptive["predicted_s"]) == 3
    assert profile["adaptive_step_s"] == pytest.approx(np.mean(adaptive["step_s"]) - np.mean(adaptive["predicted_s"]))
    save_profile(profile, tmp_path / "cal.json", cfg)
    loaded = profile_of(str(tmp_path / "cal.json"))
    assert loaded.latency_by_group_size == ((2, profile["collective_latency_s"]),)


def test_spec_names_a_calibration_file_and_is_refused_when_it_does_not_match(tmp_path):
    import json

    from seqshard.launch.spec import SpecError
    from seqshard.report.calibrate import save_profile
    from tests.helpers.training import small_spec

    model = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    path = tmp_path / "cal.json"
    save_profile({**get_profile("cpu_gloo").__dict__}, path, model)
    adaptive = ["parallel.sp_method=adaptive", "parallel.max_sp=2", f"parallel.planner.profile={path}"]
    spec = small_spec(tmp_path, 2, adaptive)  # SMALL's model is this shape: accepted
    assert spec.parallel.planner.profile == str(path)
    record = json.loads(path.read_text())
    record["machine"] = "cuda:NVIDIA H100 80GB HBM3 x8"
    path.write_text(json.dumps(record))
    with pytest.raises(SpecError, match="parallel.planner.profile.*calibrated on 'cuda:NVIDIA H100"):
        small_spec(tmp_path, 2, adaptive)


def test_microbatch_fit_recovers_known_costs_and_drives_the_cost_model():
    from seqshard.report.calibrate import MICROBATCH_CASES, fit_microbatches

    true = {"local": (0.003, 2e-5, 2e-8, 1e-4), "ulysses": (0.01, 1.5e-5, 1e-8, 3e-4),
            "ring": (0.008, 2.5e-5, 5e-9, 5e-4)}
    times = {(m, n, doc): c[0] + c[1] * n + c[2] * n * doc + c[3] * n / doc
             for m, c in true.items() for n, doc in MICROBATCH_CASES}
    fits = fit_microbatches(times)
    assert [f[:2] for f in fits] == [[1, "local"], [2, "ulysses"], [2, "ring"]]
    for size, method, *coef in fits:
        assert coef == pytest.approx(true[method], rel=1e-6)
    profile = get_profile("cpu_gloo").with_(microbatch_fit=tuple(tuple(f) for f in fits))
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=192)
    cm = CostModel.from_model_config(cfg, profile, bytes_per_element=4)
    assert cm.methods(2) == ["ulysses", "ring"] and cm.methods(1) == ["local"]
    # one micro-batch of documents 300 + 200: c0 + c1 T + c2 sum(L^2)
    c = true["ulysses"]
    assert cm.microbatch_time([300, 200], 2, "ulysses") == pytest.approx(
        c[0] + c[1] * 500 + c[2] * (300**2 + 200**2) + 2 * c[3])
    # a sequence alone pays a whole micro-batch's fixed cost, packed (pack_tokens) its share
    assert cm.method_time(300, 2, "ring") == pytest.approx(0.008 + 2.5e-5 * 300 + 5e-9 * 300**2 + 5e-4)
    from dataclasses import replace

    packed = replace(cm, pack_tokens=1000)
    assert packed.method_time(300, 2, "ring") == pytest.approx(0.008 * 300 / 2000 + 2.5e-5 * 300 + 5e-9 * 300**2
                                                               + 5e-4)
    # a profile written before the per-document term (5-tuples) reads it as 0
    old = CostModel.from_model_config(cfg, profile.with_(microbatch_fit=((2, "ring", 0.008, 2.5e-5, 5e-9),)), 4)
    assert old.microbatch_time([300], 2, "ring") == pytest.approx(0.008 + 2.5e-5 * 300 + 5e-9 * 300**2)
    assert packed.method_for(300, 2) == min(("ulysses", "ring"), key=lambda m: float(packed.method_time(300, 2, m)))
    # a size without fits keeps the analytic terms
    assert cm.methods(4) == ["ulysses", "ring"] and cm.time(1000, 4) > 0


def test_summary_names_every_fit_and_the_trainer_scales():
    from seqshard.report.calibrate import summarize

    profile = {**get_profile("cpu_gloo").__dict__, "step_overhead_s": 0.0125,
               "microbatch_fit": ((1, "local", 0.003, 2e-5, 2e-8), (2, "ring", 0.008, 3e-5, 5e-9)),
               "measured": {"trainer_fit": {"scale": {"local": 1.1, "ring": 0.9}, "runs": [{"step_s": [0.1] * 9}]}}}
    text = summarize(profile)
    assert "group of 1 local" in text and "group of 2 ring" in text and "c0    8.00 ms" in text
    assert "10-step 2-rank training runs" in text and "local x1.10, ring x0.90" in text and "12.5 ms" in text
