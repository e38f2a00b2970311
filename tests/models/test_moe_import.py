"""Native import of mixture-of-experts checkpoints (Qwen3-MoE, Mixtral, MiniMax): logits, the loss
with the router load-balancing loss, and every gradient equal transformers' (fp32, CPU, relative
1e-5) on a packed batch against transformers run one document at a time; the aux loss of one
unpadded sequence equals transformers' ``aux_loss``; bad configs are refused naming the key."""
from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("transformers")

from seqshard.models import VarlenContext, from_hf  # noqa: E402
from seqshard.models.hf import HFError  # noqa: E402
from seqshard.models.hf_moe import _other_name  # noqa: E402
from seqshard.models.moe import Experts  # noqa: E402
from tests.helpers.hf_models import (LENGTHS, MOE_FAMILIES, assert_rel_close, packed_batch,  # noqa: E402
                                     per_document_reference, save_hf_model)


def hf_param(name: str) -> str:
    """seqshard parameter name -> transformers' in-memory parameter name (fused experts)."""
    m = re.fullmatch(r"layers\.(\d+)\.mlp\.(router\.weight|experts\.gate_up|experts\.down)", name)
    if m:
        what = {"router.weight": "gate.weight", "experts.gate_up": "experts.gate_up_proj",
                "experts.down": "experts.down_proj"}[m[2]]
        return f"model.layers.{m[1]}.mlp.{what}"
    return _other_name(name)


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_import_matches_transformers(family, tmp_path):
    hf = save_hf_model(family, tmp_path)
    ours = from_hf(tmp_path)
    tokens, positions, labels = packed_batch()
    ctx = VarlenContext.from_lengths(LENGTHS)
    with torch.no_grad():
        logits = ours(tokens, positions, ctx)
    loss = ours(tokens, positions, ctx, labels=labels)
    loss.backward()
    ref_logits, ref_loss = per_document_reference(hf, tokens)  # each document's loss includes its aux loss
    assert_rel_close(f"{family} logits", logits, ref_logits)
    assert_rel_close(f"{family} loss", loss.detach(), ref_loss)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_rel_close(f"{family} grad {name}", p.grad, hf_params[hf_param(name)].grad)


@pytest.mark.parametrize("family", ["qwen3_moe", "minimax"])
def test_aux_loss_of_one_sequence_equals_transformers(family, tmp_path):
    hf = save_hf_model(family, tmp_path)
    ours = from_hf(tmp_path)
    doc = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(3))
    labels = torch.cat([doc[1:], torch.tensor([-100])])
    ours(doc, torch.arange(37), VarlenContext.from_lengths([37]), labels=labels)
    ref = hf(input_ids=doc[None], labels=doc[None]).aux_loss
    aux = ours.moe_metrics["aux_sum"] / 36  # sum_d w_d aux_d, one document with 36 loss tokens
    assert_rel_close(f"{family} aux_loss", aux, ref.detach())
    assert ours.moe_metrics["load"].shape == (len(ours.moe_modules()), ours.cfg.moe.num_experts)
    assert ours.moe_metrics["load"].sum() == 37 * 2 * len(ours.moe_modules())  # top-2 per token, per layer


def test_batched_experts_equal_a_loop_over_tokens():
    torch.manual_seed(0)
    experts = Experts(dim=8, hidden=12, num_experts=5)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(23, 8)
    top_i = torch.stack([torch.randperm(5)[:3] for _ in range(23)])
    top_i[:10] = torch.tensor([4, 0, 2])  # an unbalanced load: padding inside the groups
    top_w = torch.rand(23, 3)
    ref = torch.zeros_like(x)
    for t in range(23):
        for j in range(3):
            gate, up = (experts.gate_up[top_i[t, j]] @ x[t]).chunk(2)
            ref[t] += top_w[t, j] * (experts.down[top_i[t, j]] @ (torch.nn.functional.silu(gate) * up))
    assert_rel_close("experts", experts(x, top_i, top_w).detach(), ref.detach())


def _edit(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_bad_moe_configs_are_named(tmp_path):
    save_hf_model("minimax", tmp_path)
    _edit(tmp_path, router_jitter_noise=0.1)
    with pytest.raises(HFError, match="router_jitter_noise 0.1 is not supported"):
        from_hf(tmp_path)
    _edit(tmp_path, router_jitter_noise=0.0, scoring_func="sigmoid_noaux")
    with pytest.raises(HFError, match="scoring_func 'sigmoid_noaux' is not supported"):
        from_hf(tmp_path)
    _edit(tmp_path, scoring_func=None, sliding_window=16)
    with pytest.raises(HFError, match="sliding_window 16 is not supported for MiniMax"):
        from_hf(tmp_path)
    _edit(tmp_path, sliding_window=None, layer_types=["linear_attention", "mamba", "full_attention"])
    with pytest.raises(HFError, match=r"layer_types must be 3 of linear_attention, full_attention \(got \['mamba'\]\)"):
        from_hf(tmp_path)
    _edit(tmp_path, layer_types=["linear_attention", "full_attention", "linear_attention"], num_experts_per_tok=5)
    with pytest.raises(HFError, match=r"num_experts_per_tok 5 must be in \[1, num_experts 3\]"):
        from_hf(tmp_path)


@pytest.mark.parametrize("family", ["qwen3_moe_norm", "mixtral", "minimax"])
def test_export_round_trip_loads_in_transformers(family, tmp_path):
    """seqshard weights (changed, as training changes them) -> ``export_hf`` -> transformers'
    ``from_pretrained``: the same logits as the seqshard model."""
    from transformers import AutoModelForCausalLM

    from seqshard.launch.export import export_hf

    save_hf_model(family, tmp_path / "src")
    ours = from_hf(tmp_path / "src")
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_hf({k: v.detach() for k, v in ours.state_dict().items()}, ours.cfg, "byte", tmp_path / "out", 2**30)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager", dtype=torch.float32)
    doc = torch.randint(0, 300, (29,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = back(input_ids=doc[None]).logits[0]
        got = ours(doc, torch.arange(29), VarlenContext.from_lengths([29]))
    assert_rel_close(f"{family} exported logits", got, ref)
    assert_rel_close(f"{family} re-imported logits", from_hf(tmp_path / "out")(
        doc, torch.arange(29), VarlenContext.from_lengths([29])).detach(), got)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_aux_loss_gradient(mode, tmp_path):
    """The router probabilities logged inside a checkpointed block still carry the aux gradient."""
    from types import SimpleNamespace

    from seqshard.train.memory import apply_memory_options

    save_hf_model("minimax", tmp_path)
    tokens, positions, labels = packed_batch()
    grads = []
    for ac in ("none", mode):
        model = apply_memory_options(from_hf(tmp_path), SimpleNamespace(
            activation_checkpointing=ac, mlp_tiles=1, offload_activations=False))
        model(tokens, positions, VarlenContext.from_lengths(LENGTHS), labels=labels).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert_rel_close(f"{mode} grad {name}", grads[1][name], g)


@pytest.mark.parametrize("score, norm", [("sigmoid", True), ("softmax", False)])
def test_moe_block_with_shared_expert_equals_its_definition(score, norm):
    """Router scores (softmax or sigmoid), top-k (renormalised or not), experts and the shared expert."""
    from seqshard.models.config import ModelConfig, MoEConfig
    from seqshard.models.moe import MoE

    torch.manual_seed(1)
    moe = MoE(ModelConfig(dim=16, ffn_dim=8, moe=MoEConfig(num_experts=6, top_k=2, score=score, norm_topk=norm,
                                                            shared_expert_ffn_dim=12)))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(11, 16)
    logits = x @ moe.router.weight.T
    scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    ref = moe.shared(x)
    for t in range(11):
        w, i = scores[t].topk(2)
        w = w / w.sum() if norm else w
        for wj, e in zip(w, i):
            gate, up = (moe.experts.gate_up[e] @ x[t]).chunk(2)
            ref[t] = ref[t] + wj * (moe.experts.down[e] @ (torch.nn.functional.silu(gate) * up))
    assert_rel_close(f"{score} moe", moe(x).detach(), ref.detach())


def test_eval_mode_loss_is_the_token_loss_only(tmp_path):
    hf = save_hf_model("mixtral", tmp_path)
    ours = from_hf(tmp_path).eval()
    doc = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(7))
    labels = torch.cat([doc[1:], torch.tensor([-100])])
    with torch.no_grad():
        loss = ours(doc, torch.arange(30), VarlenContext.from_lengths([30]), labels=labels)
        ref = hf(input_ids=doc[None], labels=doc[None], output_router_logits=False).loss * 29
    assert_rel_close("eval loss", loss, ref)
