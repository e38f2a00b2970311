"""The shared step prediction prices the micro-batches the runtime forms."""
import numpy as np
import pytest

from seqshard.parallel.cost_model import CostModel
from seqshard.parallel.hardware import get_profile
from seqshard.report.step_model import predict_steps
from seqshard.train.trainer import build_batch_builder
from tests.helpers.training import small_spec


def _corpus():
    from seqshard.data.corpus import load_corpus

    return load_corpus("stdlib", max_documents=400)


@pytest.mark.parametrize("layout", [["parallel.sp_method=none"], ["parallel.sp_method=ulysses", "parallel.sp=2"]])
def test_static_step_is_the_slowest_replica_priced_per_token(tmp_path, layout):
    # c0 = 0: a micro-batch costs 1 us per token at any document length, so a step is its busiest
    # replica's tokens
    spec = small_spec(tmp_path, 2, layout)
    flat = ((32, 1e-6), (2048, 1e-6))
    curves = ((1, "local", 0.0, flat), (2, "ulysses", 0.0, flat))
    cm = CostModel.from_model_config(spec.model, get_profile("cpu_gloo").with_(microbatch_curve=curves,
                                                                                step_overhead_s=0.5))
    corpus = _corpus()
    got = predict_steps(spec, cm, 2, 3, corpus)
    builder = build_batch_builder(spec, corpus)
    dp = 2 if spec.parallel.sp_method == "none" else 1
    for step in got:
        rows = builder.next_batch().rows
        busiest = max(sum(len(r.tokens) for r in rows[k::dp]) for k in range(dp))
        assert step == pytest.approx(0.5 + 1e-6 * busiest)


def test_adaptive_step_packs_each_group_and_takes_the_slowest(tmp_path):
    spec = small_spec(tmp_path, 2, ["parallel.sp_method=adaptive", "parallel.max_sp=2",
                                    "parallel.planner.memory_tokens=128"])
    # local is much cheaper than a group of two: every step splits the documents over two singles
    # when none is longer than 128 tokens (memory), else runs one group of two
    one, two = ((32, 1e-6), (2048, 1e-6)), ((32, 1e-5), (2048, 1e-5))
    curves = ((1, "local", 0.01, one), (2, "ulysses", 0.01, two), (2, "ring", 0.01, two))
    cm = CostModel.from_model_config(spec.model, get_profile("cpu_gloo").with_(microbatch_curve=curves))
    corpus = _corpus()
    got = predict_steps(spec, cm, 2, 4, corpus)
    builder = build_batch_builder(spec, corpus)
    for step in got:
        lengths = np.array([n for r in builder.next_batch().rows for n in r.doc_lens])
        if lengths.max() > 128:  # one group of two: micro-batches of <= 256 tokens
            floor = 0.01 * np.ceil(lengths.sum() / 256) + 1e-5 * lengths.sum()
        else:  # two singles: the busier holds at least half the tokens, in <= 128-token micro-batches
            floor = 0.01 * np.ceil(lengths.sum() / 2 / 128) + 1e-6 * lengths.sum() / 2
        assert floor - 1e-9 <= step <= floor * 1.5
