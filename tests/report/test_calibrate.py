import math

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
