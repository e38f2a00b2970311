"""Checks of ``model: {hf: PATH}`` against the rest of the spec (one SpecError line each).

- Sliding-window attention (Mistral, Qwen2 with ``use_sliding_window``, Gemma 2/3 ...): seqshard's
  attention has no window. A window at least ``data.max_seq_len`` never cuts anything (no document
  chunk is longer), so it is accepted; a smaller one is refused.
- The generic wrap (``impl: transformers``) runs transformers' own layers with seqshard's attention
  and loss only: the options that patch seqshard's own blocks, attention soft-capping, dropout and
  the model keys only the native model reads are refused.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from seqshard.models.config import ModelConfig

from .spec import SpecError

# train.<key>: value the wrap supports (each patches seqshard's Block/SwiGLU, which the wrap lacks)
WRAP_TRAIN_DEFAULTS = {"activation_checkpointing": "none", "mlp_tiles": 1, "offload_activations": False}
WRAP_SP_METHODS = ("none", "ulysses", "ring", "allgather", "usp")
# config keys of heads a causal LM does not build (GPT-NeoX's classifier_dropout, GPT-2's summary_*)
UNUSED_BY_CAUSAL_LM = ("classifier_dropout", "summary_first_dropout", "summary_proj_to_labels")
# model keys only seqshard's own model code reads
NATIVE_ONLY_KEYS = ("arch", "rope_theta", "norm_eps", "layer_pattern", "linear_attn", "qkv_bias", "qk_norm",
                    "rope_scaling", "moe", "minimax")


def sliding_window(hf: dict) -> int | None:
    """The attention window some layers of the checkpoint use, or None when every layer is full."""
    window = hf.get("sliding_window")
    if not window:
        return None
    if hf.get("layer_types"):
        return int(window) if "sliding_attention" in hf["layer_types"] else None
    if hf.get("use_sliding_window") is False:
        return None
    return int(window)


def _check_window(spec, hf: dict):
    window, max_len = sliding_window(hf), spec.data.max_seq_len
    if window is not None and window < max_len:
        raise SpecError("model.hf", f"{spec.model.hf}/config.json: sliding_window {window} is smaller than "
                        f"data.max_seq_len {max_len}; seqshard attention has no window: set "
                        f"data.max_seq_len <= {window} (then the window never applies)")


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
    if hf.get("attn_logit_softcapping"):
        raise SpecError("model.hf", f"{path}/config.json: attn_logit_softcapping "
                        f"{hf['attn_logit_softcapping']} is not supported by seqshard attention")
    for key, value in sorted(hf.items()):
        if key in UNUSED_BY_CAUSAL_LM:
            continue
        if ("dropout" in key or "pdrop" in key) and isinstance(value, (int, float)) and value > 0:
            raise SpecError("model.hf", f"{path}/config.json: {key} {value} > 0; seqshard trains without "
                            "dropout (every layout must give the same loss): set it to 0")
    if spec.parallel.sp_method not in WRAP_SP_METHODS:
        raise SpecError("parallel.sp_method", f"{spec.parallel.sp_method} is not available with model.impl: "
                        f"transformers (use one of {', '.join(WRAP_SP_METHODS)})")
    t = spec.train
    for key, value in WRAP_TRAIN_DEFAULTS.items():
        if getattr(t, key) != value:
            raise SpecError(f"train.{key}", f"{getattr(t, key)!r} patches seqshard's own blocks; with "
                            f"model.impl: transformers use {value!r} (or model.impl: native)")


def check_hf(spec):
    if not spec.model.hf:
        return
    from seqshard.models.hf import HFError, weight_files, read_config

    hf = read_config(spec.model.hf)  # readable: resolve_hf_model read it already
    try:
        weight_files(Path(spec.model.hf))  # every shard present, before any rank loads
    except HFError as err:
        raise SpecError("model.hf", str(err)) from None
    _check_window(spec, hf)
    if spec.model.impl == "transformers":
        _check_wrap(spec, hf)

