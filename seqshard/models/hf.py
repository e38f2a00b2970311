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
from dataclasses import replace
from pathlib import Path

import torch

from .config import ModelConfig, RopeScalingConfig
from .hf_patterns import GEMMA_ARCHITECTURES, GEMMA_NAMES, SINK_NAMES, attention_fields, gemma_config_fields
from .rope_params import RopeError, check_scaling, scaling_from_params

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", **GEMMA_ARCHITECTURES,
                 # mixture-of-experts families (models/hf_moe.py)
                 "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral", "MiniMaxForCausalLM": "minimax"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX_FILE, BIN_FILE = "pytorch_model.bin.index.json", "pytorch_model.bin"
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


def _rope(hf: dict, path, head_dim: int, rope_theta=None, rope_scaling=None,
          seq_len=None) -> tuple[float, RopeScalingConfig]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``,
    then the overrides: ``rope_theta`` replaces theta, ``rope_scaling`` (a transformers-style
    mapping, or a RopeScalingConfig) replaces the scaling."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if not params.get("rope_type") and hf.get("rope_scaling"):
        params.update(hf["rope_scaling"])
    max_pos = hf.get("max_position_embeddings")
    if isinstance(rope_scaling, dict) and "rope_theta" in rope_scaling:  # transformers' form carries theta
        rope_scaling = dict(rope_scaling)
        inner = rope_scaling.pop("rope_theta")
        if rope_theta is not None and float(inner) != float(rope_theta):
            raise HFError(f"rope_scaling.rope_theta: {inner} disagrees with rope_theta={rope_theta}")
        rope_theta = inner
    if rope_theta is not None:
        theta = float(rope_theta)
        if theta <= 0:
            raise HFError(f"rope_theta: must be > 0, got {rope_theta}")
    where = f"{path}/config.json: rope_parameters" if rope_scaling is None else "rope_scaling"
    try:
        if rope_scaling is None:
            scaling = scaling_from_params(params, max_pos, strict=False)
        else:
            scaling = rope_scaling if isinstance(rope_scaling, RopeScalingConfig) else \
                scaling_from_params(dict(rope_scaling), max_pos, strict=True)
        if seq_len is not None and scaling.type in ("dynamic", "longrope"):
            scaling = replace(scaling, seq_len=int(seq_len))
        check_scaling(scaling, head_dim)
    except RopeError as err:
        raise HFError(f"{where}.{err.key}: {err.reason}") from None
    return theta, scaling


def model_config_fields(path, rope_theta=None, rope_scaling=None, seq_len=None) -> dict:
    """The ``ModelConfig`` keyword arguments a Hugging Face folder's ``config.json`` implies, with
    the RoPE overrides (``rope_theta``, ``rope_scaling``: the context extension; :func:`_rope`)."""
    hf = read_config(path)
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise HFError(f"{path}/config.json: architecture {', '.join(archs) or '(none)'} is not "
                      f"supported natively (supported: {', '.join(ARCHITECTURES)}; "
                      "model.impl: transformers wraps other causal LMs)")
    family = ARCHITECTURES[arch]
    if arch in GEMMA_ARCHITECTURES:
        return gemma_config_fields(hf, path, arch, rope_theta=rope_theta, rope_scaling=rope_scaling,
                                   seq_len=seq_len)
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"{path}/config.json: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("mlp_bias"):
        raise HFError(f"{path}/config.json: mlp_bias true is not supported")
    if family != "qwen2" and hf.get("attention_bias"):
        raise HFError(f"{path}/config.json: attention_bias true is not supported for {arch}")
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or dim // n_heads)
    if float(hf.get("partial_rotary_factor") or 1.0) != 1.0:
        raise HFError(f"{path}/config.json: partial_rotary_factor {hf['partial_rotary_factor']} is not supported")
    theta, scaling = _rope(hf, path, head_dim, rope_theta, rope_scaling, seq_len)
    fields = dict(arch="llama", dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                ffn_dim=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
                rope_theta=theta, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "qwen3_moe"), rope_scaling=scaling,
                attn_head_dim=0 if head_dim * n_heads == dim else head_dim,
                hf=str(path), hf_arch=arch)
    if family != "minimax":  # MiniMax's layer_types name its linear / softmax layers (models/hf_moe.py)
        fields.update(attention_fields(hf, path))
    if family in ("qwen3_moe", "mixtral", "minimax"):
        from .hf_moe import moe_fields

        fields = moe_fields(hf, family, fields, path)
    return fields


def config_from_hf(path, **rope_overrides) -> ModelConfig:
    return ModelConfig(**model_config_fields(path, **rope_overrides))


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: safetensors (one file or the shards of its index), else the
    older ``pytorch_model.bin`` form (read with torch's ``weights_only`` loader: tensors only,
    no code). Every shard an index lists must be present."""
    for index_name, single_name in ((INDEX_FILE, SINGLE_FILE), (BIN_INDEX_FILE, BIN_FILE)):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as err:
                raise HFError(f"{index}: not a weight index ({type(err).__name__}: {err})") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise HFError(f"{folder}: shard(s) {', '.join(missing)} listed in {index_name} are missing")
            return [folder / n for n in names]
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise HFError(f"{folder}: no weights ({SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE} or {BIN_INDEX_FILE})")


def read_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight file(s), by Hugging Face name."""
    from safetensors.torch import load_file

    out = {}
    for file in weight_files(Path(path)):
        if file.suffix == ".safetensors":
            out.update(load_file(str(file)))
            continue
        try:
            out.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as err:  # noqa: BLE001 - an unsafe or broken pickle: one line, no traceback
            first = str(err).splitlines()[0] if str(err) else ""
            raise HFError(f"{file}: cannot be read as plain tensors ({type(err).__name__}: {first}); "
                          "convert it to safetensors") from None
    return out


def to_dtype(dtype) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise HFError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_hf_weights(model, path):
    """Copy the folder's weights into ``model`` (a Decoder built from :func:`config_from_hf`)."""
    if model.cfg.moe.num_experts:  # experts are stacked from per-expert tensors
        from .hf_moe import load_moe_weights

        return load_moe_weights(model, path)
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


def from_hf(path, dtype=None, rope_theta=None, rope_scaling=None, seq_len=None):
    """A seqshard Decoder holding the weights of the Hugging Face folder ``path``, cast to ``dtype``
    (``torch.float32`` by default; a torch dtype or ``float32 | bfloat16 | float16``).

    ``rope_theta`` and ``rope_scaling`` override the checkpoint's RoPE (context extension), with
    the semantics of the job spec's ``model.rope_theta`` / ``model.rope_scaling``: ``rope_scaling``
    is a transformers-style mapping (``{"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 4096}``; ``{"rope_type": "default"}`` removes a scaling).
    ``seq_len``: the training length ``dynamic`` and ``longrope`` compute their frequencies for
    (default: the scaling's ``seq_len``, else config.json's ``max_position_embeddings``).
    A bad value raises :class:`HFError` naming the parameter.
    """
    from . import build_model

    dt = to_dtype(dtype)
    given = rope_scaling.get("seq_len") if isinstance(rope_scaling, dict) else getattr(rope_scaling, "seq_len", 0)
    if seq_len is None and not given:
        seq_len = read_config(path).get("max_position_embeddings")
    cfg = config_from_hf(path, rope_theta=rope_theta, rope_scaling=rope_scaling, seq_len=seq_len)
    model = build_model(cfg)  # cfg.hf is set: the weights are loaded
    for p in model.parameters():  # parameters only: a scaled RoPE's inv_freq stays fp64
        p.data = p.data.to(dt)
    return model
