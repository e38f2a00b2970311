"""MoE and MiniMax specs: bad settings are one SpecError line naming the key path, before launch
(``seqshard validate`` exits 2); an imported MoE checkpoint fills ``model.moe`` / ``model.minimax``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from seqshard.launch.spec import SpecError, load_spec
from tests.helpers.training import ROOT

TINY = ROOT / "examples" / "tiny.yaml"
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2"]


@pytest.mark.parametrize("overrides, key, message", [
    (MOE + ["model.moe.score=sinkhorn"], "model.moe.score", "router type 'sinkhorn' is not supported"),
    (MOE + ["model.moe.top_k=5"], "model.moe.top_k", "must be in [1, model.moe.num_experts 4]"),
    (MOE + ["model.moe.layers=EDX"], "model.moe.layers", "must be 2 letters of E"),
    (MOE + ["model.moe.aux_loss_coef=-1"], "model.moe.aux_loss_coef", "must be >= 0"),
    (MOE + ["parallel.sp_method=adaptive", "parallel.max_sp=2"], "parallel.sp_method", "adaptive groups do not carry"),
    (MOE + ["train.mlp_tiles=4"], "train.mlp_tiles", "mixture-of-experts MLPs run untiled"),
    (["model.arch=minimax", "model.layer_pattern=LA"], "model.moe.num_experts", "arch minimax has mixture"),
    (MOE + ["model.arch=minimax", "model.layer_pattern=LA", "parallel.sp=2", "parallel.sp_method=lasp2",
            "parallel.softmax_method=ring"], "parallel.softmax_method", "ring shards each document"),
    (MOE + ["parallel.ep=0"], "parallel.ep", "must be >= 1"),
    (MOE + ["parallel.ep=3"], "parallel.ep", "3 does not divide model.moe.num_experts 4"),
    (MOE + ["parallel.ep=4"], "parallel.ep", "4 does not divide the 2 ranks (dp x sp)"),
    (["parallel.ep=2"], "parallel.ep", "this model has none"),
    (MOE + ["parallel.ep=2", "train.engine=fsdp2"], "parallel.ep", "runs on train.engine torch only (fsdp2"),
    (MOE + ["parallel.ep=2", "train.engine=deepspeed"], "parallel.ep", "runs on train.engine torch only (DeepSpeed"),
])
def test_bad_moe_specs_are_refused_by_key(overrides, key, message):
    with pytest.raises(SpecError) as caught:
        load_spec(TINY, overrides, 2)
    assert caught.value.path == key and message in str(caught.value), str(caught.value)


def test_hf_moe_spec_fills_the_model_and_refuses_what_kernels_cannot_honour(tmp_path):
    pytest.importorskip("transformers")
    from tests.helpers.hf_models import save_hf_model

    save_hf_model("minimax", tmp_path)
    spec = load_spec(TINY, [f"model={{hf: {tmp_path}}}", "parallel.sp=2", "parallel.sp_method=lasp2"], 2)
    assert (spec.model.arch, spec.model.layer_pattern, spec.model.moe.num_experts) == ("minimax", "LAL", 3)
    assert spec.model.minimax.full_alpha == 1.2 and spec.model.moe.aux_loss_coef == 0.02
    spec = load_spec(TINY, [f"model={{hf: {tmp_path}, moe: {{aux_loss_coef: 0.0, top_k: 2}}}}"], 2)
    assert spec.model.moe.aux_loss_coef == 0.0 and spec.model.moe.num_experts == 3  # a training choice
    with pytest.raises(SpecError) as caught:
        load_spec(TINY, [f"model={{hf: {tmp_path}, moe: {{top_k: 1}}}}"], 2)
    assert caught.value.path == "model.moe.top_k" and "conflicts with" in str(caught.value)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 32}))
    proc = subprocess.run([sys.executable, "-m", "seqshard", "validate", str(TINY), "--set", f"model={{hf: {tmp_path}}}",
                           "--set", "parallel.sp=2", "--set", "parallel.sp_method=lasp2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "model.hf" in proc.stderr and "sliding_window 32 is not supported for MiniMax" in proc.stderr
