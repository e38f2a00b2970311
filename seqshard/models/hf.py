"""Hugging Face decoder checkpoints <-> seqshard's Llama-family model (native import, no torch.distributed).

A local folder with ``config.json`` and safetensors weights (one ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``) of a Llama, Mistral, Qwen2 or Qwen3 causal LM becomes
a :class:`~seqshard.models.llama.Decoder` with the same forward as ``build_model``'s. Weights map
by name through one checked table (:func:`hf_name`): a missing or unexpected key is an error
naming it. Nothing is downloaded; ``transformers`` is not needed for the native path.
Gemma 2 and Gemma 3 text import too (``hf_patterns.py``). Every layer's attention pattern
(sliding window, chunks, soft-caps, softmax scale) comes from config.json (``attention_fields``);
one seqshard cannot honour is an error, never dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import torch

from .config import ModelConfig, RopeScalingConfig
from .hf_patterns import GEMMA_ARCHITECTURES, GEMMA_NAMES, SINK_NAMES, attention_fields, gemma_config_fields

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", **GEMMA_ARCHITECTURES}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
# Checkpoint entries that carry no parameter (old Llama exports saved the RoPE buffer).
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# seqshard parameter name pattern -> Hugging Face name (one table, used both ways)
_NAME_TABLE = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.wq\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"layers\.(\d+)\.attn\.wk\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"layers\.(\d+)\.attn\.wv\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"layers\.(\d+)\.attn\.wo\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.attn\.q_norm\.weight", r"model.layers.\1.self_attn.q_norm.weight"),
    (r"layers\.(\d+)\.attn\.k_norm\.weight", r"model.layers.\1.self_attn.k_norm.weight"),
    (r"layers\.(\d+)\.mlp\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


class HFError(ValueError):
    """A Hugging Face folder seqshard cannot use; ``str(err)`` names the path and the problem."""


def hf_name(name: str, block: str = "llama") -> str:
    """seqshard parameter name -> Hugging Face checkpoint name (``layers.0.mlp.w1.weight`` ->
    ``model.layers.0.mlp.gate_proj.weight``); ``block: gemma`` names its extra norms Gemma's way."""
    for pattern, target in (GEMMA_NAMES if block == "gemma" else []) + SINK_NAMES + _NAME_TABLE:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise KeyError(f"no Hugging Face name for seqshard parameter {name!r}")


def read_config(path) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise HFError(f"{path}: not a folder (expected a Hugging Face model folder with config.json)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise HFError(f"{path}: no config.json in this folder")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise HFError(f"{cfg_file}: not valid JSON ({err.msg} at line {err.lineno})") from None


def _rope(hf: dict, path) -> tuple[float, RopeScalingConfig]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if not params.get("rope_type") and hf.get("rope_scaling"):
        params.update(hf["rope_scaling"])
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise HFError(f"{path}/config.json: rope_scaling type {kind!r} is not supported "
                      f"(supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return theta, RopeScalingConfig()
    keys = {f.name for f in fields(RopeScalingConfig)} - {"type"}
    return theta, RopeScalingConfig(type=kind, **{k: type(getattr(RopeScalingConfig(), k))(v)
                                                  for k, v in params.items() if k in keys})


def model_config_fields(path) -> dict:
    """The ``ModelConfig`` keyword arguments a Hugging Face folder's ``config.json`` implies."""
    hf = read_config(path)
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise HFError(f"{path}/config.json: architecture {', '.join(archs) or '(none)'} is not "
                      f"supported natively (supported: {', '.join(ARCHITECTURES)}; "
                      "model.impl: transformers wraps other causal LMs)")
    family = ARCHITECTURES[arch]
    if arch in GEMMA_ARCHITECTURES:
        return gemma_config_fields(hf, path, arch)
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"{path}/config.json: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("mlp_bias"):
        raise HFError(f"{path}/config.json: mlp_bias true is not supported")
    if family in ("llama", "mistral", "qwen3") and hf.get("attention_bias"):
        raise HFError(f"{path}/config.json: attention_bias true is not supported for {arch}")
    theta, scaling = _rope(hf, path)
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or dim // n_heads)
    return dict(arch="llama", dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                ffn_dim=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
                rope_theta=theta, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2", qk_norm=family == "qwen3", rope_scaling=scaling,
                attn_head_dim=0 if head_dim * n_heads == dim else head_dim,
                hf=str(path), hf_arch=arch, **attention_fields(hf, path))


def config_from_hf(path) -> ModelConfig:
    return ModelConfig(**model_config_fields(path))


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise HFError(f"{folder}: shard(s) {', '.join(missing)} listed in {INDEX_FILE} are missing")
        return [folder / n for n in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise HFError(f"{folder}: no weights ({SINGLE_FILE} or {INDEX_FILE}); only safetensors are read")


def read_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s), by Hugging Face name."""
    from safetensors.torch import load_file

    out = {}
    for file in _weight_files(Path(path)):
        out.update(load_file(str(file)))
    return out


def to_dtype(dtype) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise HFError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_hf_weights(model, path):
    """Copy the folder's weights into ``model`` (a Decoder built from :func:`config_from_hf`)."""
    weights = read_weights(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    if model.cfg.tie_embeddings:
        params.pop("lm_head.weight")
        weights.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
    wanted = {hf_name(n, model.cfg.block): n for n in params}
    missing = sorted(set(wanted) - set(weights))
    unexpected = sorted(k for k in set(weights) - set(wanted) if not IGNORED.fullmatch(k))
    if missing or unexpected:
        raise HFError(f"{path}: weights do not match {model.cfg.hf_arch or 'the config'}: "
                      f"missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    with torch.no_grad():
        for key, name in wanted.items():
            p, w = params[name], weights[key]
            if p.shape != w.shape:
                raise HFError(f"{path}: {key} has shape {tuple(w.shape)}, the config implies {tuple(p.shape)}")
            p.copy_(w.to(p.dtype))
    return model


def from_hf(path, dtype=None):
    """A seqshard Decoder holding the weights of the Hugging Face folder ``path``, cast to ``dtype``
    (``torch.float32`` by default; a torch dtype or ``float32 | bfloat16 | float16``)."""
    from .llama import build_llama

    dt = to_dtype(dtype)
    model = load_hf_weights(build_llama(config_from_hf(path)), path)
    for p in model.parameters():  # parameters only: a scaled RoPE's inv_freq stays fp64
        p.data = p.data.to(dt)
    return model
