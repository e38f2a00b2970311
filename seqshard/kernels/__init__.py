"""Fused ops, each beside its torch reference. Models call only these public entry points."""
from .attention import attention
from .cross_entropy import linear_cross_entropy
from .linear_attention import linear_attention
from .rms_norm import rms_norm
from .rope import apply_rope

__all__ = ["attention", "linear_attention", "rms_norm", "apply_rope", "linear_cross_entropy"]
