"""The single-device models: shapes, per-document positions, and the Llama forward/backward
against a plain dense computation written here from the equations (no seqshard kernel)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqshard.models import ModelConfig, VarlenContext, build_model

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=61)


def positions_for(lengths):
    return torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)


def packed_batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (sum(lengths),), generator=g)
    return tokens, positions_for(lengths), VarlenContext.from_lengths(lengths)


def dense_llama(model, tokens, lengths):
    """Logits of ``model``'s weights computed one document at a time with plain torch ops:
    RMSNorm, half-split RoPE, a causal [L, L] softmax, GQA by repeating kv heads, SwiGLU."""
    cfg = model.cfg

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(x, pos):
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
        ang = pos.double()[:, None] * inv  # [L, D/2]
        cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    outs, start = [], 0
    for n in lengths:
        x = model.embed.weight[tokens[start:start + n]]
        pos = torch.arange(n)
        for layer in model.layers:
            a, h = layer.attn, norm(x, layer.attn_norm.weight)
            q = rope((h @ a.wq.weight.T).view(n, cfg.n_heads, -1), pos)
            k = rope((h @ a.wk.weight.T).view(n, cfg.n_kv_heads, -1), pos)
            v = (h @ a.wv.weight.T).view(n, cfg.n_kv_heads, -1)
            rep = cfg.n_heads // cfg.n_kv_heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(cfg.head_dim)
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(n, -1)
            x = x + o @ a.wo.weight.T
            h = norm(x, layer.mlp_norm.weight)
            m = layer.mlp
            x = x + (F.silu(h @ m.w1.weight.T) * (h @ m.w3.weight.T)) @ m.w2.weight.T
        outs.append(norm(x, model.norm.weight) @ model.lm_head.weight.T)
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_matches_dense_forward_and_backward(tie):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    model = build_model(cfg)
    lengths = [5, 1, 12, 7]
    tokens, positions, ctx = packed_batch(lengths, cfg.vocab_size)
    labels = torch.roll(tokens, -1)
    labels[torch.cumsum(torch.tensor(lengths), 0) - 1] = -100  # no target across documents

    logits = model(tokens, positions, ctx)
    assert logits.shape == (sum(lengths), cfg.vocab_size)
    loss = model(tokens, positions, ctx, labels=labels)
    assert loss.shape == ()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    ref_logits = dense_llama(model, tokens, lengths)
    ref_loss = F.cross_entropy(ref_logits, labels, ignore_index=-100, reduction="sum")
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=f"grad of {name}")


@pytest.mark.parametrize("arch,pattern", [("llama", ""), ("linear_llama", ""), ("hybrid", "LA")])
def test_packing_equals_documents_alone(arch, pattern):
    """Positions restart per document and no token sees another document: each document's
    logits in a packed stream equal those of the document run alone."""
    torch.manual_seed(1)
    cfg = ModelConfig(**{**CFG.__dict__, "arch": arch, "layer_pattern": pattern})
    model = build_model(cfg)
    lengths = [9, 3, 14]
    tokens, positions, ctx = packed_batch(lengths, cfg.vocab_size, seed=2)
    packed = model(tokens, positions, ctx)
    start = 0
    for n in lengths:
        alone = model(tokens[start:start + n], torch.arange(n), VarlenContext.from_lengths([n]))
        torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
        start += n


def test_build_model_is_deterministic_per_seed():
    torch.manual_seed(3)
    a = build_model(CFG)
    torch.manual_seed(3)
    b = build_model(CFG)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("moe", [False, True])
def test_weighted_loss_is_the_weighted_sum_of_documents_alone(moe):
    """Per-token loss weights (one weight per document, as per-source weights give): the packed
    loss equals sum_d w_d * (loss of document d alone), the MoE load-balancing term included (its
    documents are weighted by their tokens' weights), and ``token_losses`` holds the unweighted
    per-token cross-entropy."""
    from seqshard.models.config import MoEConfig

    torch.manual_seed(4)
    cfg = ModelConfig(**{**CFG.__dict__, "moe": MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.5) if moe
                         else MoEConfig()})
    model = build_model(cfg).train()
    lengths, doc_weights = [9, 3, 14], [2.0, 0.5, 1.25]
    tokens, positions, ctx = packed_batch(lengths, cfg.vocab_size, seed=5)
    labels = torch.cat([torch.cat([tokens[s + 1:s + n], torch.tensor([-100])])
                        for s, n in zip([0, 9, 12], lengths)])
    weights = torch.repeat_interleave(torch.tensor(doc_weights), torch.tensor(lengths))
    with torch.no_grad():
        packed = model(tokens, positions, ctx, labels, weights)
    per_token = model.token_losses.clone()
    want, aux_unweighted, start = 0.0, 0.0, 0
    for n, w in zip(lengths, doc_weights):
        with torch.no_grad():
            alone = model(tokens[start:start + n], torch.arange(n), VarlenContext.from_lengths([n]),
                          labels[start:start + n])
        want = want + w * alone
        torch.testing.assert_close(per_token[start:start + n], model.token_losses, rtol=1e-5, atol=1e-5)
        if moe:  # the wrong alternative: cross-entropy weighted, the aux term by loss-token counts
            aux = cfg.moe.aux_loss_coef * float(model.moe_metrics["aux_sum"])
            aux_unweighted += (w - 1.0) * aux
        start += n
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-5)
    if moe:
        assert abs(want.item() - aux_unweighted - packed.item()) > 1e-3  # the check can fail
    unit = model(tokens, positions, ctx, labels, torch.ones(len(tokens)))
    assert torch.equal(unit, model(tokens, positions, ctx, labels))  # weights 1: bit for bit the unweighted loss
