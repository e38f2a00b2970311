"""Plain single-device model definitions with pluggable attention (no torch.distributed)."""
from .config import LinearAttnConfig, ModelConfig
from .context import VarlenContext, causal_varlen_attention
from .hf import from_hf
from .llama import Attention, Decoder, build_llama

_BUILDERS = {"llama": build_llama}


def register_arch(name, builder):
    _BUILDERS[name] = builder


def build_model(cfg: ModelConfig):
    if cfg.impl == "transformers":  # the generic wrap: transformers' own model, seqshard's attention
        from .hf_wrap import wrap_hf

        return wrap_hf(cfg.hf)
    if cfg.arch not in _BUILDERS:
        # linear_llama / hybrid / minimax register themselves on import
        from . import linear_llama, minimax  # noqa: F401
    model = _BUILDERS[cfg.arch](cfg)
    if cfg.hf:  # model: {hf: PATH}: the architecture came from config.json, the weights follow
        from .hf import load_hf_weights

        load_hf_weights(model, cfg.hf)
    return model


__all__ = ["ModelConfig", "LinearAttnConfig", "VarlenContext", "causal_varlen_attention",
           "Attention", "Decoder", "build_llama", "build_model", "register_arch",
           "from_hf"]
