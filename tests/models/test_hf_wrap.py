"""Generic wrap (model.impl: transformers): transformers' own Gemma, Phi, StableLM with seqshard's attention
give transformers' eager loss and every gradient on a packed batch (fp32, 1e-5), one process."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from seqshard.models import VarlenContext  # noqa: E402
from tests.helpers.hf_models import (LENGTHS, WRAP_FAMILIES, assert_rel_close,  # noqa: E402
                                     packed_batch, per_document_reference, save_hf_model)

def transformers_reference(folder, tokens, lengths=LENGTHS):
    """transformers alone (eager attention), one document at a time: logits, summed loss, grads."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    logits, loss = per_document_reference(hf, tokens, lengths)
    return logits, loss, {f"hf.{name}": p.grad for name, p in hf.named_parameters()}


def check_wrap_matches_transformers(family, folder):
    """The wrapped ``family`` (saved into ``folder``) gives transformers' logits, loss and every
    gradient on a packed batch; its head goes into the fused loss (Phi's bias, Gemma 2's soft-cap)."""
    from seqshard.models.hf_wrap import wrap_hf

    save_hf_model(family, folder)
    tokens, positions, labels = packed_batch()
    ref_logits, ref_loss, ref_grads = transformers_reference(folder, tokens)
    model = wrap_hf(folder)
    assert model.fused_loss
    ctx = VarlenContext.from_lengths(LENGTHS)
    with torch.no_grad():
        assert_rel_close(f"{family} logits", model(tokens, positions, ctx), ref_logits)
    loss = model(tokens, positions, ctx, labels=labels)
    assert_rel_close(f"{family} loss", loss.detach(), ref_loss)
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(ref_grads)
    for name, p in model.named_parameters():
        assert_rel_close(f"{family} grad {name}", p.grad, ref_grads[name])


@pytest.mark.parametrize("family", list(WRAP_FAMILIES))
def test_wrap_matches_transformers(tmp_path, family):
    check_wrap_matches_transformers(family, tmp_path)


def test_flash_varlen_kwargs_without_seqshard(tmp_path):
    """Registered as attn_implementation='seqshard', the function also serves plain transformers
    calls that pass the flash-attention varlen keywords (cu_seq_lens_q/k, max_length_q/k)."""
    from transformers import AutoModelForCausalLM

    from seqshard.models.hf_wrap import register_attention

    save_hf_model("gemma", tmp_path)
    tokens, positions, _ = packed_batch()
    ref_logits, _, _ = transformers_reference(tmp_path, tokens)
    register_attention()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="seqshard", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="attention_fn"):  # not wrapped: no attention_fn installed
        hf(input_ids=tokens[None], position_ids=positions[None])
    from seqshard.models.hf_wrap import HFWrap

    HFWrap(hf)
    cu = VarlenContext.from_lengths(LENGTHS).cu_seqlens
    with torch.no_grad():
        logits = hf(input_ids=tokens[None], position_ids=positions[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=max(LENGTHS), max_length_k=max(LENGTHS)).logits[0]
    assert_rel_close("gemma varlen logits", logits, ref_logits)


def test_bf16_autocast(tmp_path):
    """train.dtype bfloat16 runs the step under autocast: transformers' fp32 RoPE leaves q/k fp32 beside a
    bf16 v; the wrap hands the attention one dtype (autocast's) and the loss stays near fp32's."""
    from seqshard.models.hf_wrap import wrap_hf

    save_hf_model("gemma", tmp_path)
    tokens, positions, labels = packed_batch()
    model = wrap_hf(tmp_path)
    ctx = VarlenContext.from_lengths(LENGTHS)
    ref = model(tokens, positions, ctx, labels=labels).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, positions, ctx, labels=labels)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item()), (loss.item(), ref.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
