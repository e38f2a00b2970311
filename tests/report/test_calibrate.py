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
