"""Tiny random Hugging Face causal LMs built locally with transformers' own classes (no download)."""
from __future__ import annotations

import torch

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6, max_position_embeddings=256)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3_scaled": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0})),
    "llama_linear_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
}

# Mixture-of-experts families (models/moe.py, models/minimax.py): 4 experts, top-2, the aux loss on.
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02)
MOE_FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        MOE, num_experts=4, moe_intermediate_size=32, head_dim=24, norm_topk_prob=False,
        num_hidden_layers=3, mlp_only_layers=[1])),
    "qwen3_moe_norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        MOE, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MOE, num_local_experts=4, sliding_window=None)),
    # lightning (linear) layers 0 and 2, softmax layer 1; residual scales != 1 so a dropped one shows
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", dict(
        MOE, num_local_experts=3, num_hidden_layers=3, block_size=8,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_attn_alpha_factor=0.9, linear_attn_beta_factor=1.1, full_attn_alpha_factor=1.2,
        full_attn_beta_factor=0.8, mlp_alpha_factor=0.95, mlp_beta_factor=1.05)),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model of ``family`` with random weights (biases and norms randomised too,
    so a mapping that drops or swaps one shows)."""
    import transformers

    cfg_cls, model_cls, extra = {**FAMILIES, **MOE_FAMILIES, **WRAP_FAMILIES, **PATTERN_FAMILIES}[family]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms (1 + noise) and biases (noise)
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    return model


def save_hf_model(family: str, folder, seed: int = 0, **overrides):
    model = make_hf_model(family, seed, **overrides)
    model.save_pretrained(folder)
    return model


def save_tokenizer(folder, vocab_size: int = 300, files: int = 20):
    """A byte-level BPE tokenizer trained locally on a few stdlib files; BOS/EOS named in
    tokenizer_config.json the way transformers writes them."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from seqshard.data.corpus import stdlib_files

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(stdlib_files()[:files], trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return tok


# Causal LMs the native import does not cover, for the generic wrap (model.impl: transformers):
# Gemma (sqrt(dim) embedding scale, (1 + w) RMSNorm, GeLU MLP, tied head, head_dim != dim / heads)
# and Phi (LayerNorm, partial RoPE, parallel attention + MLP, lm_head bias in the fused loss).
WRAP_FAMILIES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=24)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5, layer_norm_eps=1e-5)),
    # StableLM's attention does not pass **kwargs on: the context reaches it through its module
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.25, pad_token_id=0,
                                                               bos_token_id=1, eos_token_id=2)),
}


# Attention patterns (issue #29), windows smaller than the test documents: Mistral and Qwen2 with
# sliding windows (Qwen2: only layers >= max_window_layers slide), Gemma 2 (attention and final
# soft-caps, alternating windows, query_pre_attn_scalar), Gemma 3 text (local/global layers, two
# RoPEs, q/k norms), and GPT-OSS (sinks, alternating windows; MoE: the generic wrap only).
PATTERN_FAMILIES = {
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=8,
                                                             max_window_layers=1)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=16, sliding_window=8, num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        head_dim=16, sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


# ---- parity checks against transformers (one process and SP ranks share these) ----

RTOL = 1e-5
LENGTHS = [21, 6, 33]  # not multiples of the SP degree: the ShardPlan pads per document


def assert_rel_close(name, got, ref, rtol=RTOL):
    """max |got - ref| relative to max |ref| (floor 1e-6) within ``rtol``."""
    err = (got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)
    assert err <= rtol, f"{name}: max rel error {err:.2e} > {rtol:.0e}"


def packed_batch(vocab=300, lengths=LENGTHS, seed=5):
    """tokens, per-document positions and next-token labels (-100 at each document's end)."""
    tokens = torch.randint(0, vocab, (sum(lengths),), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.full_like(tokens, -100)
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for a, b in zip(cu[:-1], cu[1:]):
        labels[a:b - 1] = tokens[a + 1:b]
    return tokens, positions, labels


def per_document_reference(hf, tokens, lengths=LENGTHS, mask=None):
    """transformers ``hf`` run one document at a time: concatenated logits and the summed loss,
    after its backward (the gradients are left in ``hf``'s parameters). ``mask(n)``, if given, is
    the ``attention_mask`` of an ``n``-token document (e.g. a chunked-attention mask)."""
    logits, loss, start = [], 0.0, 0
    for n in lengths:
        kw = {"attention_mask": mask(n)} if mask is not None else {}
        out = hf(input_ids=tokens[None, start:start + n], labels=tokens[None, start:start + n], **kw)
        logits.append(out.logits[0])
        loss = loss + out.loss * (n - 1)
        start += n
    loss.backward()
    return torch.cat(logits).detach(), loss.detach()


def assert_sharded_loss_and_grads(tag, loss, ref_loss, model, ref_grad, rtol_of=lambda name: RTOL):
    """On an SP rank: backward of this shard's ``loss``; the loss summed over ranks equals
    ``ref_loss`` and every parameter's gradient summed over ranks equals ``ref_grad(name)``
    (within ``rtol_of(name)``)."""
    import torch.distributed as dist

    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    assert_rel_close(f"{tag} loss", total, ref_loss)
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        assert_rel_close(f"{tag} grad {name}", p.grad, ref_grad(name), rtol_of(name))
