"""``model: {hf: PATH}`` in a spec: keys come from config.json; conflicts and bad folders are one
SpecError line naming the key path, before any process group."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from seqshard.launch.spec import SpecError, from_dict  # noqa: E402
from tests.helpers.hf_models import save_hf_model  # noqa: E402


def test_model_keys_come_from_config_json(tmp_path):
    save_hf_model("llama3_scaled", tmp_path)
    spec = from_dict({"model": {"hf": str(tmp_path), "n_heads": 4}}, world_size=1)
    m = spec.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size) == (64, 2, 4, 2, 300)
    assert m.rope_scaling.type == "llama3" and m.rope_scaling.factor == 8.0
    assert m.hf_arch == "LlamaForCausalLM" and m.impl == "native"


def test_conflicting_key_and_bad_folder(tmp_path):
    save_hf_model("qwen2", tmp_path)
    with pytest.raises(SpecError, match=r"^model.dim: 128 conflicts with .*config.json \(64\)"):
        from_dict({"model": {"hf": str(tmp_path), "dim": 128}}, world_size=1)
    with pytest.raises(SpecError, match=r"^model.hf: .*empty: no config.json"):
        (tmp_path / "empty").mkdir()
        from_dict({"model": {"hf": str(tmp_path / "empty")}}, world_size=1)
    with pytest.raises(SpecError, match=r"^model.impl: 'jax' is not one of"):
        from_dict({"model": {"hf": str(tmp_path), "impl": "jax"}}, world_size=1)
