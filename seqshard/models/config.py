"""Model hyper-parameters (plain data; the job spec's ``model:`` section maps onto this)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LinearAttnConfig:
    decay: str = "none"  # none | fixed | data


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "llama"  # llama | linear_llama | hybrid
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    vocab_size: int = 259
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    layer_pattern: str = ""  # hybrid only: one letter per layer, L linear, A softmax
    linear_attn: LinearAttnConfig = field(default_factory=LinearAttnConfig)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads
