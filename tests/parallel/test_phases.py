"""Phased plans: long sequences first over all devices, then the rest, when that is faster."""
from dataclasses import replace

import numpy as np
import pytest

from seqshard.models.config import ModelConfig
from seqshard.parallel.cost_model import CostModel
from seqshard.parallel.hardware import get_profile
from seqshard.parallel.phases import long_sequences, plan_phased
from seqshard.parallel.planner import plan_step

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=192)
# measured-like curves: a group of two costs more device-seconds per token than a device alone,
# the per-token cost grows with the document's length
CURVES = tuple((size, method, c0, tuple((doc, c1 + c2 * doc) for doc in (32, 512, 1024, 2048)))
               for size, method, c0, c1, c2 in ((1, "local", 0.003, 3e-5, 2.6e-8),
                                                (2, "ulysses", 0.014, 2.1e-5, 1.4e-8),
                                                (2, "ring", 0.007, 3e-5, 8e-9)))
CM = replace(CostModel.from_model_config(CFG, get_profile("cpu_gloo").with_(microbatch_curve=CURVES), 4),
             pack_tokens=1024)
KW = dict(max_sp=2, memory_tokens=1024, cost_model=CM)


def test_a_long_document_runs_first_on_both_devices_then_the_rest_one_per_device():
    lengths = [1800] + [200] * 12
    phased = plan_phased(lengths, 2, **KW)
    assert phased.doc_ids == [[0], list(range(1, 13))]
    assert [[s for _, s in p.groups] for p in phased.phases] == [[2], [1, 1]]
    assert phased.predicted_time_s == pytest.approx(sum(p.predicted_time_s for p in phased.phases))
    one = plan_step(lengths, 2, **KW)
    assert [s for _, s in one.groups] == [2] and phased.predicted_time_s < one.predicted_time_s
    # one phase only when asked, or when nothing (or everything) is long
    assert len(plan_phased(lengths, 2, max_phases=1, **KW).phases) == 1
    assert len(plan_phased([200] * 12, 2, **KW).phases) == 1
    assert len(plan_phased([1800, 1500], 2, **KW).phases) == 1


def test_phases_are_kept_only_when_predicted_faster():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 40))
        lengths = np.where(rng.random(n) < 0.1, rng.integers(1025, 2048, n), rng.integers(16, 1024, n))
        phased = plan_phased(lengths, 2, **KW)
        one = plan_step(lengths, 2, **KW)
        assert phased.predicted_time_s <= one.predicted_time_s * (1 + 1e-12)
        assert sorted(i for ids in phased.doc_ids for i in ids) == list(range(n))  # every sequence once
        long = long_sequences(lengths, 2, **KW)
        assert long[lengths > 1024].all()
        if len(phased.phases) == 2:
            assert set(phased.doc_ids[0]) == set(np.flatnonzero(long).tolist())
