"""Checks of the model's attention patterns and of ``model: {hf: PATH}`` against the rest of the
spec (one SpecError line each).

- Attention patterns (sliding windows, chunks, soft-caps, sinks: issue #29) are honoured by every
  SP method and kernel path; what is refused is a pattern that cannot mean anything: a letter of
  ``model.layer_types`` that is not F/S/C, a count that is not ``n_layers``, a sliding or chunked
  layer without its size, a pattern on a model whose token mixers are not softmax attention.
- The generic wrap (``impl: transformers``) runs transformers' own layers with seqshard's attention
  and loss (activation checkpointing, offload and the tiled MLP apply to its decoder layers too):
  chunked attention (transformers builds it as a mask the wrap never gets), dropout and the model
  keys only the native model reads are refused.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from seqshard.models.config import LAYER_LETTERS, ModelConfig

from .spec import SpecError

WRAP_SP_METHODS = ("none", "ulysses", "ring", "allgather", "usp")
# config keys of heads a causal LM does not build (GPT-NeoX's classifier_dropout, GPT-2's summary_*)
UNUSED_BY_CAUSAL_LM = ("classifier_dropout", "summary_first_dropout", "summary_proj_to_labels")
# model keys only seqshard's own model code reads
NATIVE_ONLY_KEYS = ("arch", "rope_theta", "norm_eps", "layer_pattern", "linear_attn", "qkv_bias", "qk_norm",
                    "rope_scaling", "layer_types", "sliding_window", "sliding_window_pattern", "attn_chunk_size",
                    "attn_softcap", "final_softcap", "attn_scale", "local_rope_theta", "attn_sinks", "block",
                    "embed_padding_idx", "moe", "minimax")


PATTERN_KEYS = ("layer_types", "sliding_window", "sliding_window_pattern", "attn_chunk_size", "attn_softcap",
                "final_softcap", "attn_scale", "local_rope_theta", "attn_sinks")
BLOCKS = ("llama", "gemma")


def check_patterns(m):
    """``model.*`` attention-pattern keys: consistent, and on a model that has softmax layers."""
    default = ModelConfig()
    set_keys = [k for k in PATTERN_KEYS if getattr(m, k) != getattr(default, k)]
    if m.block not in BLOCKS:
        raise SpecError("model.block", f"{m.block!r} is not one of {', '.join(BLOCKS)}")
    if set_keys and m.arch != "llama":
        raise SpecError(f"model.{set_keys[0]}", f"attention patterns apply to arch llama (softmax attention in every "
                        f"layer), not {m.arch}")
    for key in ("sliding_window", "sliding_window_pattern", "attn_chunk_size"):
        if getattr(m, key) < 0:
            raise SpecError(f"model.{key}", f"must be >= 0, got {getattr(m, key)}")
    for key in ("attn_softcap", "final_softcap", "attn_scale", "local_rope_theta"):
        if getattr(m, key) < 0:
            raise SpecError(f"model.{key}", f"must be >= 0, got {getattr(m, key)}")
    if m.layer_types:
        bad = sorted(set(m.layer_types) - set(LAYER_LETTERS))
        if bad:
            raise SpecError("model.layer_types", f"letter(s) {''.join(bad)} not one of F (full), S (sliding), "
                            "C (chunked)")
        if len(m.layer_types) != m.n_layers:
            raise SpecError("model.layer_types", f"{len(m.layer_types)} letters for model.n_layers {m.n_layers}")
    kinds = {m.layer_type(i) for i in range(m.n_layers)}
    if "sliding_attention" in kinds and m.sliding_window <= 0:
        raise SpecError("model.sliding_window", "sliding layers (model.layer_types S) need a window > 0")
    if "chunked_attention" in kinds and m.attn_chunk_size <= 0:
        raise SpecError("model.attn_chunk_size", "chunked layers (model.layer_types C) need a chunk size > 0")


def _check_wrap(spec, hf: dict):
    m, path = spec.model, spec.model.hf
    if importlib.util.find_spec("transformers") is None:
        raise SpecError("model.impl", "transformers is not installed: pip install 'seqshard[hf]'")
    from transformers import CONFIG_MAPPING

    if hf.get("model_type") not in CONFIG_MAPPING:
        raise SpecError("model.hf", f"{path}/config.json: model_type {hf.get('model_type')!r} is not known to the "
                        "installed transformers (upgrade it, or the folder is not a transformers model)")
    default = ModelConfig()
    for key in NATIVE_ONLY_KEYS:
        if getattr(m, key) != getattr(default, key):
            raise SpecError(f"model.{key}", "only read by seqshard's own model, not by model.impl: "
                            "transformers; drop the key")
    types = hf.get("layer_types") or []
    if hf.get("attention_chunk_size") or "chunked_attention" in types:
        raise SpecError("model.hf", f"{path}/config.json: chunked attention (attention_chunk_size "
                        f"{hf.get('attention_chunk_size')}) is a mask in transformers, which model.impl: transformers "
                        "cannot take; use model.impl: native with model.attn_chunk_size")
    for key, value in sorted(hf.items()):
        if key in UNUSED_BY_CAUSAL_LM:
            continue
        if ("dropout" in key or "pdrop" in key) and isinstance(value, (int, float)) and value > 0:
            raise SpecError("model.hf", f"{path}/config.json: {key} {value} > 0; seqshard trains without "
                            "dropout (every layout must give the same loss): set it to 0")
    if spec.parallel.sp_method not in WRAP_SP_METHODS:
        raise SpecError("parallel.sp_method", f"{spec.parallel.sp_method} is not available with model.impl: "
                        f"transformers (use one of {', '.join(WRAP_SP_METHODS)})")


def check_hf(spec):
    check_patterns(spec.model)
    if not spec.model.hf:
        return
    from seqshard.models.hf import HFError, weight_files, read_config

    hf = read_config(spec.model.hf)  # readable: resolve_hf_model read it already
    try:
        weight_files(Path(spec.model.hf))  # every shard present, before any rank loads
    except HFError as err:
        raise SpecError("model.hf", str(err)) from None
    if spec.model.impl == "transformers":
        _check_wrap(spec, hf)

