"""The public names of DESIGN.md import from their packages, with the documented call shapes."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

PARALLEL = ["pack", "decompose", "plan_step", "static_plan", "ShardPlan", "ulysses_attention", "ring_attention",
            "usp_attention", "lasp2_attention", "lasp1_attention", "allgather_attention", "parallelize"]
KERNELS = ["attention", "linear_attention", "rms_norm", "apply_rope", "linear_cross_entropy"]


@pytest.mark.parametrize("name", PARALLEL)
def test_parallel_exports(name):
    import seqshard.parallel

    exec(f"from seqshard.parallel import {name}", {})  # the statement a user writes
    value = getattr(seqshard.parallel, name)
    assert callable(value) and name in seqshard.parallel.__all__ and not inspect.ismodule(value), value


@pytest.mark.parametrize("name", KERNELS)
def test_kernels_exports(name):
    import seqshard.kernels

    exec(f"from seqshard.kernels import {name}", {})
    assert callable(getattr(seqshard.kernels, name)) and name in seqshard.kernels.__all__


def test_contract_signatures():
    from seqshard.kernels import attention, linear_attention
    from seqshard.parallel import ShardPlan, parallelize, plan_step, ring_attention, static_plan, ulysses_attention

    def params(fn):
        return list(inspect.signature(fn).parameters)

    assert params(attention)[:10] == ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                                      "causal", "softmax_scale", "return_lse"]
    assert params(linear_attention)[:8] == ["q", "k", "v", "g", "scale", "initial_state", "output_final_state",
                                            "cu_seqlens"]
    for fn in (ulysses_attention, ring_attention):
        assert params(fn)[:5] == ["q", "k", "v", "plan", "group"] and "causal" in params(fn)
    assert {"max_sp", "memory_tokens", "cost_model", "solver"} <= set(params(plan_step))
    assert params(static_plan)[:3] == ["lengths", "num_devices", "sp"]
    assert params(parallelize) == ["model", "mesh", "cfg"]
    assert hasattr(ShardPlan, "shard") and hasattr(ShardPlan, "gather")


def test_parallelize_stays_the_function_after_its_module_is_imported():
    code = ("import seqshard.parallel.parallelize, seqshard.parallel as p, inspect; "
            "from seqshard.parallel import parallelize; print(inspect.isfunction(parallelize), inspect.isfunction(p.parallelize))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"], out
