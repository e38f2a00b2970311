"""The memory model: its terms move the way each knob says, and the fit search inverts it."""
import dataclasses

import pytest

from seqshard.models.config import ModelConfig
from seqshard.models.llama import build_llama
from seqshard.parallel import memory_model as mm

TINY = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=259)


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, tie_embeddings=True),
                                 dataclasses.replace(TINY, arch="hybrid", layer_pattern="LA")])
def test_param_count_matches_the_built_model(cfg):
    from seqshard.models import build_model

    model = build_model(cfg)
    assert mm.n_params(cfg) == sum(p.numel() for p in model.parameters())


def test_checkpointing_offload_tiles_and_sp_each_lower_the_peak():
    base = mm.MemoryConfig(device="cuda")
    L = 1 << 16
    peak = lambda **kw: mm.predict_peak(TINY, L, dataclasses.replace(base, **kw))["total"]
    assert peak(checkpointing="full") < peak(checkpointing="lean") < peak(checkpointing="selective") < peak()
    # lean keeps the kernel's output only where attention() runs whole; ring recomputes as full does
    assert peak(checkpointing="lean", sp=2, sp_method="ring") == peak(checkpointing="full", sp=2, sp_method="ring")
    assert peak(checkpointing="full", offload=True) < peak(checkpointing="full")
    assert peak(mlp_tiles=0) < peak()
    assert peak(sp=4, sp_method="ring") < 0.3 * peak()
    cpu = dataclasses.replace(base, device="cpu", checkpointing="full")
    assert mm.predict_peak(TINY, L, dataclasses.replace(cpu, offload=True)) == mm.predict_peak(TINY, L, cpu)


def test_zero_stages_shard_states():
    c = mm.MemoryConfig(dp=8)
    states = [mm.state_bytes(TINY, dataclasses.replace(c, zero_stage=s)) for s in range(4)]
    assert states[0] > states[1] > states[2] > states[3]
    assert states[3] == pytest.approx(states[0] / 8)


def test_activations_grow_linearly_in_length():
    c = mm.MemoryConfig(checkpointing="selective", device="cuda")
    a, b = (mm.predict_peak(TINY, n, c)["total"] - mm.state_bytes(TINY, c) for n in (1 << 15, 1 << 17))
    assert b / a == pytest.approx(4, rel=0.05)


def test_longest_fitting_is_the_boundary():
    c = mm.MemoryConfig(sp=4, sp_method="ulysses", checkpointing="full", device="cuda")
    cap = 2 * 2**30
    n = mm.longest_fitting(TINY, c, cap)
    assert n % 4 == 0 and n > 0
    assert mm.predict_peak(TINY, n, c)["total"] <= cap < mm.predict_peak(TINY, n + 4, c)["total"]
    assert mm.longest_fitting(TINY, c, 1.0) == 0


def test_adaptive_planner_memory_tokens_come_from_the_memory_model(tmp_path):
    from seqshard.parallel.adaptive import planner_memory_tokens
    from tests.helpers.training import small_spec

    spec = small_spec(tmp_path, 2, ["parallel.sp_method=adaptive", "parallel.max_sp=2", "train.device_memory_gb=1"])
    c = dataclasses.replace(mm.config_from_spec(spec, 2, "cpu"), sp=1, sp_method="none")
    expected = mm.longest_fitting(spec.model, c, 2**30)
    assert expected > spec.data.max_seq_len  # the model's figure, not the default
    assert planner_memory_tokens(spec, 2) == expected
    assert planner_memory_tokens(small_spec(tmp_path, 2, ["parallel.sp_method=adaptive", "parallel.max_sp=2"]), 2) == 256
    pinned = small_spec(tmp_path, 2, ["parallel.sp_method=adaptive", "parallel.max_sp=2", "train.device_memory_gb=1",
                                      "parallel.planner.memory_tokens=999"])
    assert planner_memory_tokens(pinned, 2) == 999
