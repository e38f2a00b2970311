"""Hugging Face Qwen3-MoE, Mixtral and MiniMax checkpoints <-> seqshard's MoE decoders (no torch.distributed).

Config: :func:`moe_fields` adds the router / expert keys (``model.moe``) and, for MiniMax, the layer
pattern (``linear_attention`` -> ``L``, ``full_attention`` -> ``A``) and residual scales
(``model.minimax``) to the dense fields ``hf.model_config_fields`` derives. Settings seqshard cannot
honour raise :class:`~seqshard.models.hf.HFError` naming the config.json key.

Weights: experts are ``[E, 2F, D]`` / ``[E, D, F]`` tensors here; checkpoints hold them per expert,
as ``save_pretrained`` writes them (Qwen3-MoE ``mlp.experts.<e>.{gate,up,down}_proj``, Mixtral and
MiniMax ``block_sparse_moe.experts.<e>.{w1,w3,w2}``), or fused (``experts.gate_up_proj``,
``experts.down_proj``, transformers 5's in-memory names); both load, export writes the per-expert form.
"""
from __future__ import annotations

import re

import torch

from .config import MiniMaxBlockConfig, MoEConfig

MOE_FAMILIES = {"Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral",
                "MiniMaxForCausalLM": "minimax"}
LAYER_KINDS = {"linear_attention": "L", "full_attention": "A"}
# MiniMax stores its decay tables as buffers; seqshard recomputes them from the layer index.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)")
_LIGHTNING = {"qkv_proj.weight": "qkv_proj.weight", "output_gate.weight": "output_gate.weight",
              "out_proj.weight": "out_proj.weight", "norm": "norm.weight"}


def moe_fields(hf: dict, family: str, fields: dict, path) -> dict:
    """``fields`` (the dense ModelConfig keywords) completed for an MoE family."""
    from .hf import HFError

    where = f"{path}/config.json"
    n_layers = fields["n_layers"]
    num_experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    top_k = int(hf.get("num_experts_per_tok") or 0)
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise HFError(f"{where}: num_experts_per_tok {top_k} must be in [1, num_experts {num_experts}]")
    if float(hf.get("router_jitter_noise") or 0.0):
        raise HFError(f"{where}: router_jitter_noise {hf['router_jitter_noise']} is not supported "
                      "(random input scaling of the router in training); set it to 0")
    for key in ("scoring_func", "topk_method", "router_type"):  # routers of other families
        if hf.get(key) not in (None, "softmax", "greedy"):
            raise HFError(f"{where}: {key} {hf[key]!r} is not supported (softmax top-k routers only)")
    layers = ""
    if family == "qwen3_moe":
        step, dense = int(hf.get("decoder_sparse_step") or 1), set(hf.get("mlp_only_layers") or [])
        layers = "".join("E" if i not in dense and (i + 1) % step == 0 else "D" for i in range(n_layers))
        layers = "" if set(layers) == {"E"} else layers
    expert_ffn = int(hf["moe_intermediate_size"]) if family == "qwen3_moe" else fields["ffn_dim"]
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, expert_ffn_dim=expert_ffn, score="softmax",
                    norm_topk=bool(hf.get("norm_topk_prob", False)) if family == "qwen3_moe" else True,
                    aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)), layers=layers)
    out = {**fields, "moe": moe}
    if family != "minimax":
        return out
    if hf.get("sliding_window"):
        raise HFError(f"{where}: sliding_window {hf['sliding_window']} is not supported for MiniMax "
                      "(its softmax layers would attend within a window); set it to null")
    types = hf.get("layer_types") or ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(n_layers)]
    bad = sorted({t for t in types if t not in LAYER_KINDS})
    if len(types) != n_layers or bad:
        raise HFError(f"{where}: layer_types must be {n_layers} of {', '.join(LAYER_KINDS)} (got {bad or len(types)})")
    scales = MiniMaxBlockConfig(**{k: float(hf.get(h, 1.0)) for k, h in (
        ("linear_alpha", "linear_attn_alpha_factor"), ("linear_beta", "linear_attn_beta_factor"),
        ("full_alpha", "full_attn_alpha_factor"), ("full_beta", "full_attn_beta_factor"),
        ("mlp_alpha", "mlp_alpha_factor"), ("mlp_beta", "mlp_beta_factor"))})
    return {**out, "arch": "minimax", "layer_pattern": "".join(LAYER_KINDS[t] for t in types), "minimax": scales}


def _moe_prefix(family: str, layer: int) -> str:
    return f"model.layers.{layer}." + ("mlp" if family == "qwen3_moe" else "block_sparse_moe")


def _expert_names(family: str, prefix: str, e: int) -> tuple[str, str, str]:
    """Per-expert (gate, up, down) checkpoint names."""
    if family == "qwen3_moe":
        return tuple(f"{prefix}.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down"))
    return tuple(f"{prefix}.experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))


def _other_name(name: str) -> str:
    """seqshard name -> HF name for everything but the experts and the router."""
    from .hf import hf_name

    m = re.fullmatch(r"layers\.(\d+)\.attn\.(qkv_proj\.weight|output_gate\.weight|out_proj\.weight|norm)", name)
    if m:
        return f"model.layers.{m[1]}.self_attn.{_LIGHTNING[m[2]]}"
    return hf_name(name)


def hf_to_seqshard(weights: dict, model, path) -> dict:
    """Checkpoint tensors (HF names) -> seqshard state (names of ``model``'s parameters); a
    missing or unexpected tensor raises HFError naming it."""
    from .hf import IGNORED as DENSE_IGNORED, HFError

    cfg, family = model.cfg, MOE_FAMILIES[model.cfg.hf_arch]
    weights, out = dict(weights), {}
    missing = []

    def take(key):
        if key not in weights:
            missing.append(key)
            return None
        return weights.pop(key)

    for name, p in model.named_parameters():
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.(router\.weight|experts\.gate_up|experts\.down)", name)
        if not m:
            out[name] = take(_other_name(name))
            continue
        prefix, what = _moe_prefix(family, int(m[1])), m[2]
        if what == "router.weight":
            out[name] = take(f"{prefix}.gate.weight")
        elif f"{prefix}.experts.gate_up_proj" in weights:  # fused form
            out[name] = take(f"{prefix}.experts.{'gate_up_proj' if what == 'experts.gate_up' else 'down_proj'}")
        else:
            per = [_expert_names(family, prefix, e) for e in range(cfg.moe.num_experts)]
            if what == "experts.gate_up":
                parts = [(take(g), take(u)) for g, u, _ in per]
                out[name] = None if missing else torch.stack([torch.cat(gu) for gu in parts])
            else:
                downs = [take(d) for _, _, d in per]
                out[name] = None if missing else torch.stack(downs)
    unexpected = sorted(k for k in weights if not (IGNORED.fullmatch(k) or DENSE_IGNORED.fullmatch(k)
                                                  or (k == "lm_head.weight" and cfg.tie_embeddings)))
    if missing or unexpected:
        raise HFError(f"{path}: weights do not match {cfg.hf_arch}: missing {missing or 'none'}, "
                      f"unexpected {unexpected or 'none'}")
    return out


def seqshard_to_hf(state: dict, cfg) -> dict:
    """seqshard state -> checkpoint tensors (per-expert names, as ``save_pretrained`` writes)."""
    family, out = MOE_FAMILIES[cfg.hf_arch], {}
    for name, t in state.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.(router\.weight|experts\.gate_up|experts\.down)", name)
        if not m:
            out[_other_name(name)] = t
            continue
        prefix = _moe_prefix(family, int(m[1]))
        if m[2] == "router.weight":
            out[f"{prefix}.gate.weight"] = t
            continue
        for e in range(t.shape[0]):
            gate, up, down = _expert_names(family, prefix, e)
            if m[2] == "experts.gate_up":
                out[gate], out[up] = (x.contiguous() for x in t[e].chunk(2, dim=0))
            else:
                out[down] = t[e].contiguous()
    return out


def load_moe_weights(model, path):
    from .hf import HFError, read_weights

    state = hf_to_seqshard(read_weights(path), model, path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in state.items():
            if params[name].shape != w.shape:
                raise HFError(f"{path}: {name} has shape {tuple(w.shape)}, the config implies {tuple(params[name].shape)}")
            params[name].copy_(w.to(params[name].dtype))
    return model
