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


def _wrap(folder, **sections):
    raw = {"model": {"hf": str(folder), "impl": "transformers"}}
    for key, value in sections.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return raw


def test_generic_wrap_spec_and_refusals(tmp_path):
    save_hf_model("gemma", tmp_path / "gemma")
    m = from_dict(_wrap(tmp_path / "gemma"), world_size=1).model
    assert (m.impl, m.hf_arch, m.head_dim, m.n_heads, m.tie_embeddings) == ("transformers", "GemmaForCausalLM",
                                                                             24, 4, True)
    # the memory options apply to the wrap's decoder layers too (#29)
    from_dict(_wrap(tmp_path / "gemma", train__activation_checkpointing="selective", train__mlp_tiles=0,
                    train__offload_activations=True), world_size=1)
    cases = {
        "parallel.sp_method": dict(parallel__sp_method="adaptive", parallel__max_sp=2),
    }
    for path, sections in cases.items():
        with pytest.raises(SpecError, match=rf"^{path}: .*model.impl: transformers"):
            from_dict(_wrap(tmp_path / "gemma", **sections), world_size=2)
    raw = _wrap(tmp_path / "gemma")
    raw["model"]["qk_norm"] = True
    with pytest.raises(SpecError, match=r"^model.qk_norm: only read by seqshard's own model"):
        from_dict(raw, world_size=1)
    save_hf_model("phi", tmp_path / "phi", resid_pdrop=0.1)
    with pytest.raises(SpecError, match=r"^model.hf: .*config.json: resid_pdrop 0.1 > 0"):
        from_dict(_wrap(tmp_path / "phi"), world_size=1)


def test_sliding_window_below_max_seq_len_is_trained_with_it(tmp_path):
    """Issue #29: a window smaller than data.max_seq_len is honoured (no refusal, no silent drop);
    a window switched off by use_sliding_window: false stays off."""
    save_hf_model("mistral", tmp_path, sliding_window=512)
    spec = from_dict({"model": {"hf": str(tmp_path)}, "data": {"max_seq_len": 1024}}, world_size=1)
    assert (spec.model.hf_arch, spec.model.sliding_window, spec.model.layer_type(1)) == \
        ("MistralForCausalLM", 512, "sliding_attention")
    save_hf_model("qwen2", tmp_path / "q", sliding_window=64, use_sliding_window=False)  # window switched off
    spec = from_dict({"model": {"hf": str(tmp_path / "q")}, "data": {"max_seq_len": 1024}}, world_size=1)
    assert spec.model.layer_type(0) == "full_attention" and spec.model.sliding_window == 0


def test_attention_pattern_keys_are_checked(tmp_path):
    """One line naming the key for a pattern that cannot mean anything."""
    base = {"model": {"n_layers": 2}}
    for model, match in [({"layer_types": "SX"}, r"^model.layer_types: letter\(s\) X"),
                         ({"layer_types": "S"}, r"^model.layer_types: 1 letters for model.n_layers 2"),
                         ({"layer_types": "SF"}, r"^model.sliding_window: sliding layers"),
                         ({"layer_types": "CF"}, r"^model.attn_chunk_size: chunked layers"),
                         ({"attn_softcap": -1.0}, r"^model.attn_softcap: must be >= 0"),
                         ({"block": "gpt"}, r"^model.block: 'gpt' is not one of"),
                         ({"arch": "linear_llama", "sliding_window": 8}, r"^model.sliding_window: attention patterns "
                                                                           r"apply to arch llama")]:
        with pytest.raises(SpecError, match=match):
            from_dict({**base, "model": {**base["model"], **model}}, world_size=1)
    spec = from_dict({"model": {"n_layers": 3, "layer_types": "SCF", "sliding_window": 16, "attn_chunk_size": 32,
                                "attn_sinks": True}}, world_size=1)
    assert [spec.model.layer_type(i) for i in range(3)] == ["sliding_attention", "chunked_attention", "full_attention"]


def test_wrap_refuses_chunked_attention(tmp_path):
    save_hf_model("llama", tmp_path, attention_chunk_size=16)
    with pytest.raises(SpecError, match=r"^model.hf: .*chunked attention \(attention_chunk_size 16\) is a mask"):
        from_dict(_wrap(tmp_path), world_size=1)

