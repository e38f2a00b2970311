"""``seqshard export`` of runs trained with train.engine deepspeed (ZeRO 0, 1, 3) and fsdp2: the
exported weights equal those of the same spec trained with the torch engine (same losses, so the
same weights up to reduction order), and the HF folder loads in transformers with them."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from seqshard.launch.cli import main  # noqa: E402
from tests.helpers.ranks import run_ranks  # noqa: E402
from tests.helpers.training import train_rank  # noqa: E402

ATOL = 1e-5


def _export_torch(run, out):
    assert main(["export", str(run), "--format", "torch", "--out", str(out)]) == 0
    return torch.load(out / "model.pt")


@pytest.fixture(scope="module")
def torch_weights(tmp_path_factory):
    run = tmp_path_factory.mktemp("torch")
    run_ranks(2, train_rank, str(run), [])
    return _export_torch(run, run / "pt")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed0", "deepspeed1", "deepspeed3", "fsdp2"])
def test_export_of_each_engine_equals_torch_engine(torch_weights, tmp_path, engine):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from seqshard.models.hf import hf_name

    overrides = (["train.engine=fsdp2"] if engine == "fsdp2" else
                 ["train.engine=deepspeed", f"train.zero_stage={engine[-1]}"])
    run_ranks(2, train_rank, str(tmp_path), overrides, timeout=600)
    ours = _export_torch(tmp_path, tmp_path / "pt")
    assert sorted(ours) == sorted(torch_weights)
    for name, ref in torch_weights.items():
        err = (ours[name].float() - ref).abs().max().item()
        assert err <= ATOL, f"{engine} {name}: max abs diff {err:.2e} > {ATOL}"
    assert main(["export", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, ref in torch_weights.items():
        assert torch.equal(saved[hf_name(name)], ours[name].float()), name
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(hf.get_output_embeddings().weight, ours["lm_head.weight"].float())
