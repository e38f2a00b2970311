"""RoPE extension of imported checkpoints: for every RoPE type transformers ships for Llama / Qwen2
(and a theta change alone), seqshard's logits at 4x ``original_max_position_embeddings`` equal
transformers' (fp32, relative 1e-5); the ``from_hf`` overrides give the same model as a checkpoint
that carries the scaling; bad scalings are refused naming the parameter."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from seqshard.models import VarlenContext, from_hf  # noqa: E402
from seqshard.models.hf import HFError  # noqa: E402
from tests.helpers.hf_models import assert_rel_close, save_hf_model  # noqa: E402
from tests.helpers.rope_cases import CASES, LENGTHS, LONG, ORIG, packed_tokens, padded_reference  # noqa: E402


def _logits(model, tokens, positions):
    with torch.no_grad():
        return model(tokens, positions, VarlenContext.from_lengths(LENGTHS))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_extended_rope_matches_transformers(case, family, tmp_path):
    hf = save_hf_model(family, tmp_path, **CASES[case])
    tokens, positions = packed_tokens()
    ref = padded_reference(hf, tokens)
    assert_rel_close(f"{family}/{case}", _logits(from_hf(tmp_path, seq_len=LONG), tokens, positions), ref)
    # the scaling is what makes them equal: plain RoPE at theta 1e4 is far off
    plain = from_hf(tmp_path, rope_theta=10000.0, rope_scaling={"rope_type": "default"})
    err = (_logits(plain, tokens, positions) - ref).abs().max() / ref.abs().max()
    assert err > 1e-3, f"{case}: plain RoPE is as close as the scaled one ({err:.1e})"


@pytest.mark.parametrize("case", ["theta", "yarn", "dynamic", "longrope"])
def test_overrides_equal_a_checkpoint_with_the_scaling(case, tmp_path):
    """A default-RoPE checkpoint + from_hf(rope_theta=, rope_scaling=) == the same weights saved
    with that RoPE in config.json (and == transformers with it)."""
    scaled = save_hf_model("llama", tmp_path / "scaled", **CASES[case])
    save_hf_model("llama", tmp_path / "plain", max_position_embeddings=ORIG)
    params = dict(CASES[case].get("rope_scaling") or {"rope_type": "default"})
    theta = params.pop("rope_theta", CASES[case].get("rope_theta"))
    if case == "dynamic":
        params["original_max_position_embeddings"] = ORIG
    tokens, positions = packed_tokens()
    ours = from_hf(tmp_path / "plain", rope_theta=theta, rope_scaling=params, seq_len=LONG)
    assert_rel_close(case, _logits(ours, tokens, positions), padded_reference(scaled, tokens))


def test_bad_rope_overrides_name_the_parameter(tmp_path):
    save_hf_model("llama", tmp_path)
    bad = {
        r"rope_scaling\.factor: must be >= 1": {"rope_type": "linear", "factor": 0.5},
        r"rope_scaling\.original_max_position_embeddings: yarn RoPE needs": {"rope_type": "yarn", "factor": 4.0},
        r"rope_scaling\.short_factor: has 3 numbers, head_dim 16 needs 8": {
            "rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0] * 3, "long_factor": [1.0] * 8},
        r"rope_scaling\.type: 'ntk' is not a RoPE type": {"rope_type": "ntk", "factor": 2.0},
        r"rope_scaling\.factor: linear RoPE needs it": {"rope_type": "linear"},
        r"rope_scaling\.beta: is not a parameter of yarn": {"rope_type": "yarn", "factor": 2.0, "beta": 3,
                                                            "original_max_position_embeddings": 16},
        r"rope_scaling\.high_freq_factor: 1.0 must be > low_freq_factor": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
            "original_max_position_embeddings": 16},
    }
    for match, scaling in bad.items():
        with pytest.raises(HFError, match=match):
            from_hf(tmp_path, rope_scaling=scaling)
    with pytest.raises(HFError, match=r"rope_theta: must be > 0"):
        from_hf(tmp_path, rope_theta=-1.0)
    with pytest.raises(HFError, match=r"rope_scaling.rope_theta: 5.0 disagrees with rope_theta=6.0"):
        from_hf(tmp_path, rope_theta=6.0, rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 5.0})


def test_rope_theta_inside_rope_scaling_is_used(tmp_path):
    """transformers' rope_parameters carry rope_theta: from_hf takes it from there too."""
    save_hf_model("llama", tmp_path)
    inside = from_hf(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    beside = from_hf(tmp_path, rope_theta=5e5, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert inside.cfg.rope_theta == beside.cfg.rope_theta == 5e5
    assert torch.equal(inside.layers[0].attn.inv_freq, beside.layers[0].attn.inv_freq)


@pytest.mark.parametrize("case", ["yarn_mscale", "longrope"])
def test_loss_and_gradients_with_an_attention_factor(case, tmp_path):
    """The cos/sin amplitude is in the backward too: loss and every gradient equal transformers'."""
    from seqshard.models.hf import hf_name
    from tests.helpers.hf_models import per_document_reference

    hf = save_hf_model("qwen2", tmp_path, **CASES[case])
    tokens, positions = packed_tokens()
    labels = torch.full_like(tokens, -100)
    start = 0
    for n in LENGTHS:  # every document is longer than ORIG: transformers uses long_factor for each
        labels[start:start + n - 1] = tokens[start + 1:start + n]
        start += n
    ours = from_hf(tmp_path, seq_len=LONG)
    loss = ours(tokens, positions, VarlenContext.from_lengths(LENGTHS), labels=labels)
    loss.backward()
    _, ref_loss = per_document_reference(hf, tokens, LENGTHS)
    assert_rel_close(f"{case} loss", loss.detach(), ref_loss)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert_rel_close(f"{case} grad {name}", p.grad, hf_params[hf_name(name)].grad)
