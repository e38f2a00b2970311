"""Native import of Hugging Face checkpoints: logits, loss and every gradient equal transformers'
(fp32, CPU, relative 1e-5), for each family, on one document and on a packed batch."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from seqshard.models import VarlenContext, from_hf  # noqa: E402
from seqshard.models.hf import HFError, hf_name  # noqa: E402
from tests.helpers.hf_models import FAMILIES, save_hf_model  # noqa: E402

RTOL = 1e-5


def assert_close(name, got, ref, rtol=RTOL):
    err = (got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert err <= rtol, f"{name}: max rel error {err:.2e} > {rtol:.0e}"


def hf_forward(hf, doc):
    """Logits [n, vocab] and summed next-token loss of one document through transformers."""
    out = hf(input_ids=doc[None], labels=doc[None])
    return out.logits[0], out.loss * (len(doc) - 1)


def packed_labels(lengths, tokens):
    labels = torch.full_like(tokens, -100)
    start = 0
    for n in lengths:
        labels[start:start + n - 1] = tokens[start + 1:start + n]
        start += n
    return labels


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers(family, tmp_path):
    hf = save_hf_model(family, tmp_path)
    ours = from_hf(tmp_path)
    lengths = [23, 9, 32]
    tokens = torch.randint(0, 300, (sum(lengths),), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in lengths])
    ctx = VarlenContext.from_lengths(lengths)

    logits = ours(tokens, positions, ctx)
    loss = ours(tokens, positions, ctx, labels=packed_labels(lengths, tokens))
    loss.backward()
    ref_loss, start = 0.0, 0
    for n in lengths:  # transformers runs each document alone: packing must not leak across
        ref_logits, doc_loss = hf_forward(hf, tokens[start:start + n])
        assert_close(f"{family} logits doc@{start}", logits[start:start + n].detach(), ref_logits.detach())
        ref_loss = ref_loss + doc_loss
        start += n
    assert_close(f"{family} loss", loss.detach(), ref_loss.detach())
    ref_loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_close(f"{family} grad {name}", p.grad, hf_params[hf_name(name)].grad)


def test_single_document_and_sharded_checkpoint(tmp_path):
    hf = save_hf_model("qwen2", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    doc = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2))
    ref_logits, _ = hf_forward(hf, doc)
    for folder in ("one", "sharded"):
        ours = from_hf(tmp_path / folder)
        logits = ours(doc, torch.arange(40), VarlenContext.from_lengths([40]))
        assert_close(f"{folder} logits", logits.detach(), ref_logits.detach())


def test_dtype_cast(tmp_path):
    save_hf_model("llama", tmp_path)
    assert from_hf(tmp_path, dtype="bfloat16").embed.weight.dtype == torch.bfloat16
    with pytest.raises(HFError, match="dtype 'int8'"):
        from_hf(tmp_path, dtype="int8")


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(HFError, match="no config.json"):
        from_hf(tmp_path)
    save_hf_model("llama", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "other.bin")
    with pytest.raises(HFError, match="no weights"):
        from_hf(tmp_path)
    (tmp_path / "other.bin").rename(tmp_path / "model.safetensors")
    _edit_config(tmp_path, rope_parameters={"rope_type": "proportional", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(HFError, match="rope_parameters.type: 'proportional' is not a RoPE type"):
        from_hf(tmp_path)
    _edit_config(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                 architectures=["GPT2LMHeadModel"])
    with pytest.raises(HFError, match="GPT2LMHeadModel is not supported"):
        from_hf(tmp_path)
    _edit_config(tmp_path, architectures=["Qwen3ForCausalLM"])  # Qwen3 expects q_norm / k_norm
    with pytest.raises(HFError, match=r"missing \['model.layers.0.self_attn.k_norm.weight'"):
        from_hf(tmp_path)
