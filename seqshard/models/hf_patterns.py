"""Attention patterns of Hugging Face checkpoints (issue #29) and the Gemma 2 / Gemma 3 text import.

``attention_fields`` reads what decides each layer's attention from a ``config.json``:
``layer_types`` (transformers 5), else ``sliding_window`` (with Qwen2's ``use_sliding_window``
and Gemma 3's ``sliding_window_pattern``), ``attention_chunk_size``, ``attn_logit_softcapping``,
``final_logit_softcapping`` and ``query_pre_attn_scalar``. A layer kind or key seqshard cannot
honour is an :class:`HFError` naming it: a checkpoint's window is never dropped silently
(DESIGN.md invariant 10).

Gemma 2 and Gemma 3 text (``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``) map onto ``block: gemma``
(``(1 + w)`` RMSNorms, a norm after attention and after the MLP, GeLU-tanh MLP, ``sqrt(dim)``
embedding scale), with Gemma 3's q/k norms and its two RoPEs (local theta on sliding layers,
the global theta and scaling on full layers).
"""
from __future__ import annotations

from .config import RopeScalingConfig

LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
GEMMA_ARCHITECTURES = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}
# seqshard name -> Hugging Face name where Gemma's blocks differ from Llama's
GEMMA_NAMES = [
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.pre_feedforward_layernorm.weight"),
    (r"layers\.(\d+)\.post_attn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.post_mlp_norm\.weight", r"model.layers.\1.post_feedforward_layernorm.weight"),
]
SINK_NAMES = [(r"layers\.(\d+)\.attn\.sinks", r"model.layers.\1.self_attn.sinks")]


def _error(path, msg):
    from .hf import HFError

    return HFError(f"{path}/config.json: {msg}")


def attention_fields(hf: dict, path) -> dict:
    """``ModelConfig`` keywords for the attention pattern of each layer (empty: all full causal)."""
    n_layers = int(hf["num_hidden_layers"])
    window = hf.get("sliding_window")
    chunk = hf.get("attention_chunk_size")
    types = hf.get("layer_types")
    if types is None:
        if hf.get("use_sliding_window") is False:
            window = None
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern")
        if window and pattern:
            types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention" for i in range(n_layers)]
        else:
            kind = "sliding_attention" if window else "chunked_attention" if chunk else "full_attention"
            types = [kind] * n_layers
    types = list(types)
    if len(types) != n_layers:
        raise _error(path, f"layer_types has {len(types)} entries for {n_layers} layers")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise _error(path, f"layer_types {', '.join(unknown)} not supported (seqshard attention has "
                     f"{', '.join(LAYER_TYPES)})")
    if "sliding_attention" in types and not window:
        raise _error(path, "layer_types has sliding_attention layers but sliding_window is not set")
    if "chunked_attention" in types and not chunk:
        raise _error(path, "layer_types has chunked_attention layers but attention_chunk_size is not set")
    out = {}
    if set(types) != {"full_attention"}:
        out["layer_types"] = "".join(t[0].upper() for t in types)  # F / S / C, as ModelConfig spells them
    if "sliding_attention" in types:
        out["sliding_window"] = int(window)
    if "chunked_attention" in types:
        out["attn_chunk_size"] = int(chunk)
    if hf.get("attn_logit_softcapping"):
        out["attn_softcap"] = float(hf["attn_logit_softcapping"])
    if hf.get("final_logit_softcapping"):
        out["final_softcap"] = float(hf["final_logit_softcapping"])
    if hf.get("query_pre_attn_scalar"):
        out["attn_scale"] = float(hf["query_pre_attn_scalar"]) ** -0.5
    return out


def _gemma_rope(hf: dict, path, family: str, head_dim: int, **overrides) -> dict:
    """Gemma 3 keeps one RoPE per layer kind in ``rope_parameters``: the full layers' theta and
    scaling, and the sliding layers' (unscaled) theta. ``overrides`` (rope_theta, rope_scaling,
    seq_len: the context extension) apply to the full layers."""
    from .hf import _rope

    params = hf.get("rope_parameters") or {}
    if family == "gemma2" or "full_attention" not in params:
        theta, scaling = _rope(hf, path, head_dim, **overrides)
        local = float(hf.get("rope_local_base_freq") or 0.0) if family == "gemma3" else 0.0
        return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local)
    theta, scaling = _rope({"rope_parameters": params["full_attention"],
                            "max_position_embeddings": hf.get("max_position_embeddings")}, path, head_dim, **overrides)
    sliding = params.get("sliding_attention") or {}
    if sliding.get("rope_type", "default") != "default":
        raise _error(path, f"rope_parameters.sliding_attention.rope_type {sliding['rope_type']!r} is not "
                     "supported (the sliding layers' RoPE is unscaled)")
    return dict(rope_theta=theta, rope_scaling=scaling or RopeScalingConfig(),
                local_rope_theta=float(sliding.get("rope_theta", 10000.0)))


def gemma_config_fields(hf: dict, path, arch: str, **rope_overrides) -> dict:
    """``ModelConfig`` keywords of a Gemma 2 or Gemma 3 text checkpoint."""
    family = GEMMA_ARCHITECTURES[arch]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise _error(path, f"hidden_activation {act!r} is not supported for {arch} (gelu_pytorch_tanh only)")
    if hf.get("attention_bias"):
        raise _error(path, f"attention_bias true is not supported for {arch}")
    if family == "gemma3" and hf.get("use_bidirectional_attention"):
        raise _error(path, "use_bidirectional_attention true is not supported (seqshard attention is causal)")
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or dim // n_heads)
    fields = dict(arch="llama", dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
                  n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), ffn_dim=int(hf["intermediate_size"]),
                  vocab_size=int(hf["vocab_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=False,
                  qk_norm=family == "gemma3", attn_head_dim=0 if head_dim * n_heads == dim else head_dim,
                  hf=str(path), hf_arch=arch, block="gemma",
                  embed_padding_idx=-1 if hf.get("pad_token_id") is None else int(hf["pad_token_id"]))
    fields.update(_gemma_rope(hf, path, family, head_dim, **rope_overrides))
    fields.update(attention_fields(hf, path))
    fields.setdefault("attn_scale", head_dim ** -0.5)
    return fields
