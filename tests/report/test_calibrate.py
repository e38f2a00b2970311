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

    from seqshard.report.calibration_file import CalibrationError, load_calibration, save_profile

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
    from seqshard.report.calibrate import calibrate_model
    from seqshard.report.calibration_file import save_profile
    from tests.helpers.training import ROOT, SMALL

    sets = [*SMALL, "model.n_kv_heads=4", "train.steps=4"]
    cfg = load_spec(ROOT / "examples/tiny.yaml", sets).model
    profile = calibrate_model(cfg, spec_path=ROOT / "examples/tiny.yaml", overrides=sets, trainer_steps=4, repeats=1)
    assert profile["bw_by_group_size"][0][0] == 2 and profile["bw_by_group_size"][0][1] > 0
    assert profile["latency_by_group_size"][0][0] == 2 and profile["step_overhead_s"] > 0
    assert [c[:2] for c in profile["microbatch_curve"]] == [(1, "local"), (2, "ulysses"), (2, "ring")]
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
    from seqshard.report.calibration_file import save_profile
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


def test_microbatch_curve_recovers_known_costs_and_drives_the_cost_model():
    from seqshard.report.calibrate import CURVE_LENGTHS, MICROBATCH_CASES, fit_microbatches

    # per-token seconds at each measured length: a step where the kernel's tiling changes (512)
    true = {m: (c0, {doc: h + (2e-5 if doc >= 512 else 0.0) + 1e-9 * doc for doc in CURVE_LENGTHS})
            for m, c0, h in (("local", 0.003, 2e-5), ("ulysses", 0.01, 1.5e-5), ("ring", 0.008, 2.5e-5))}
    times = {(m, n, doc): c0 + (n // doc * doc) * per[doc]
             for m, (c0, per) in true.items() for n, doc in MICROBATCH_CASES}
    curves = fit_microbatches(times)
    assert [c[:2] for c in curves] == [(1, "local"), (2, "ulysses"), (2, "ring")]
    for size, method, c0, points in curves:
        assert c0 == pytest.approx(true[method][0], rel=1e-6)
        assert [doc for doc, _ in points] == list(CURVE_LENGTHS)
        assert [h for _, h in points] == pytest.approx([true[method][1][doc] for doc in CURVE_LENGTHS], rel=1e-6)
    profile = get_profile("cpu_gloo").with_(microbatch_curve=curves)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=192)
    cm = CostModel.from_model_config(cfg, profile, bytes_per_element=4)
    assert cm.methods(2) == ["ulysses", "ring"] and cm.methods(1) == ["local"]
    # one micro-batch of documents 384 + 200: c0 + each document's tokens x the per-token cost at
    # its length (between measured lengths, linear)
    c0, per = true["ulysses"]
    at_200 = per[192] + (per[256] - per[192]) * 8 / 64
    assert cm.microbatch_time([384, 200], 2, "ulysses") == pytest.approx(c0 + 384 * per[384] + 200 * at_200)
    # past the longest measured length, the last segment's slope continues
    slope = (per[2048] - per[1536]) / 512
    assert cm.microbatch_time([4096], 2, "ulysses") == pytest.approx(c0 + 4096 * (per[2048] + slope * 2048))
    # a sequence alone pays a whole micro-batch's fixed cost, packed (pack_tokens) its share
    c0, per = true["ring"]
    assert cm.method_time(256, 2, "ring") == pytest.approx(c0 + 256 * per[256])
    from dataclasses import replace

    packed = replace(cm, pack_tokens=1000)
    assert packed.method_time(256, 2, "ring") == pytest.approx(c0 * 256 / 2000 + 256 * per[256])
    assert packed.method_for(300, 2) == min(("ulysses", "ring"), key=lambda m: float(packed.method_time(300, 2, m)))
    # the planner's table prices every pair as method_time does, curves and analytic sizes alike
    lengths = np.array([100, 700, 3000])
    names, times = packed.method_times(lengths, [1, 2, 4])
    assert names == [["local"], ["ulysses", "ring"], ["ulysses", "ring"]]
    for k, d in enumerate((1, 2, 4)):
        for m, method in enumerate(names[k]):
            assert times[m, :, k] == pytest.approx(packed.method_time(lengths, d, method), rel=1e-12)
    assert np.isinf(times[1, :, 0]).all()  # size 1 has one method
    # a size without curves keeps the analytic terms
    assert cm.methods(4) == ["ulysses", "ring"] and cm.time(1000, 4) > 0


def test_a_calibration_file_from_before_the_curves_is_refused_in_one_line(tmp_path):
    import json

    from seqshard.report.calibration_file import CalibrationError, load_calibration, save_profile

    path = tmp_path / "old.json"
    save_profile({**get_profile("cpu_gloo").__dict__}, path)
    record = json.loads(path.read_text())
    del record["profile"]["microbatch_curve"]
    record["profile"]["microbatch_fit"] = [[2, "ring", 0.008, 2.5e-5, 5e-9, 5e-4]]
    path.write_text(json.dumps(record))
    with pytest.raises(CalibrationError, match="older seqshard.*recalibrate: seqshard calibrate --spec"):
        load_calibration(path)


def test_summary_names_every_curve_and_the_trainer_scales():
    from seqshard.report.calibrate import summarize

    curve = ((32, 3e-5), (256, 3.1e-5), (512, 4.3e-5), (2048, 7e-5))
    runs = [{"method": m, "step_s": [0.1] * 9} for m in ("local", "ring") * 2]  # 2 per layout
    profile = {**get_profile("cpu_gloo").__dict__, "step_overhead_s": 0.0125,
               "microbatch_curve": ((1, "local", 0.003, curve), (2, "ring", 0.008, curve)),
               "measured": {"trainer_fit": {"scale": {"local": 1.1, "ring": 0.9}, "runs": runs}}}
    text = summarize(profile)
    assert "group of 1 local" in text and "group of 2 ring" in text and "c0   8.00 ms" in text
    assert "32: 30.0, 256: 31.0, 512: 43.0, 2048: 70.0" in text
    assert "10-step 2-rank training runs of the spec, the median of 2 per layout" in text
    assert "local x1.10, ring x0.90" in text and "12.5 ms" in text


def _fails_on_rank_one(rank, init_file, queue):
    if rank == 1:
        raise ValueError("a case this worker cannot run")
    queue.put(rank)


def test_a_calibration_process_that_dies_is_an_error_not_a_hang():
    """Before the shared helper, the parent joined the workers, then blocked on the queue forever
    when one had died without putting its result there."""
    from seqshard.report.calibrate import _in_processes

    with pytest.raises(RuntimeError, match=r"calibration \(micro-batches\): process 1 exited with 1"):
        _in_processes(_fails_on_rank_one, (), 60, "micro-batches")


def test_calibration_progress_is_one_numbered_line_per_stage_off_a_terminal(capsys):
    """Off a terminal (pytest captures stderr: not a tty) every stage is one line on stderr,
    numbered out of the total."""
    from seqshard.report.calibrate import _Stages

    with _Stages(2) as stages:
        for what in ("compute", "training run, local 1/1"):
            stages.start(what)
            stages.finish()
    assert capsys.readouterr().err.splitlines() == ["calibrate [1/2]: compute",
                                                    "calibrate [2/2]: training run, local 1/1"]
