"""Issue #29, generic wrap (model.impl: transformers): GPT-OSS (learned sinks, alternating sliding
windows, MoE), Gemma 2 (soft-caps, windows) and Mistral (window) run transformers' own layers with
seqshard attention and give transformers' eager logits, loss and every gradient (fp32, 1e-5)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from seqshard.models import VarlenContext  # noqa: E402
from tests.helpers.hf_models import LENGTHS, assert_rel_close, packed_batch, save_hf_model  # noqa: E402
from tests.models.test_hf_wrap import transformers_reference  # noqa: E402


@pytest.mark.parametrize("family", ["gpt_oss", "gemma2", "mistral_window"])
def test_wrap_patterns_match_transformers(tmp_path, family):
    from seqshard.models.hf_wrap import wrap_hf

    save_hf_model(family, tmp_path)
    tokens, positions, labels = packed_batch()
    ref_logits, ref_loss, ref_grads = transformers_reference(tmp_path, tokens)
    model = wrap_hf(tmp_path)
    assert model.fused_loss  # Gemma 2's final soft-cap goes into the fused loss
    ctx = VarlenContext.from_lengths(LENGTHS)
    with torch.no_grad():
        assert_rel_close(f"{family} logits", model(tokens, positions, ctx), ref_logits)
    loss = model(tokens, positions, ctx, labels=labels)
    assert_rel_close(f"{family} loss", loss.detach(), ref_loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert_rel_close(f"{family} grad {name}", p.grad, ref_grads[name])


def test_wrap_refuses_a_window_the_layer_does_not_pass(tmp_path):
    """A model whose config has a window its attention call does not carry is refused, not run full."""
    from seqshard.models.hf_wrap import wrap_hf

    save_hf_model("mistral_window", tmp_path)
    model = wrap_hf(tmp_path)
    for m in model._attention:
        m.seqshard_window = 16  # what config.json would say if the layer dropped its window
    tokens, positions, _ = packed_batch()
    with pytest.raises(ValueError, match="config.json gives a sliding window of 16, the layer passed 8"):
        model(tokens, positions, VarlenContext.from_lengths(LENGTHS))
