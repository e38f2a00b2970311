"""Model hyper-parameters (plain data; the job spec's ``model:`` section maps onto this)."""
from __future__ import annotations

from dataclasses import dataclass, field


LAYER_LETTERS = {"F": "full_attention", "S": "sliding_attention", "C": "chunked_attention"}


@dataclass(frozen=True)
class LinearAttnConfig:
    decay: str = "none"  # none | fixed | data


@dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling, transformers' ``rope_parameters`` types and keys (formulas:
    ``seqshard/kernels/rope_scaling.py``). Keys a type does not use keep their defaults."""
    type: str = "none"  # none | linear | dynamic | yarn | llama3 | longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # the pre-extension length (dynamic: HF's max_position_embeddings)
    attention_factor: float = 0.0  # yarn, longrope: cos/sin amplitude; 0 = derived from factor
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 0.0  # yarn: with mscale_all_dim, attention_factor = mscale ratio
    mscale_all_dim: float = 0.0  # yarn
    truncate: bool = True  # yarn: floor / ceil the correction range
    short_factor: list = field(default_factory=list)  # longrope: head_dim / 2 numbers
    long_factor: list = field(default_factory=list)  # longrope: head_dim / 2 numbers
    seq_len: int = 0  # dynamic, longrope: the length frequencies are computed for; 0 = data.max_seq_len


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLPs (models/moe.py). ``num_experts: 0`` keeps the dense SwiGLU MLP."""
    num_experts: int = 0
    top_k: int = 2
    expert_ffn_dim: int = 0  # 0 = ffn_dim
    score: str = "softmax"  # router scores: softmax | sigmoid
    norm_topk: bool = True  # renormalise the k chosen scores to sum to 1
    aux_loss_coef: float = 0.001  # load-balancing loss weight (transformers' router_aux_loss_coef default)
    shared_expert_ffn_dim: int = 0  # 0 = no shared expert
    layers: str = ""  # one letter per layer: E mixture of experts, D dense MLP; "" = every layer E


@dataclass(frozen=True)
class MiniMaxBlockConfig:
    """MiniMax-Text-01 block details (models/minimax.py): residual scales of the normalised input
    (alpha) and of the mixer / MLP output (beta), per layer kind."""
    linear_alpha: float = 1.0
    linear_beta: float = 1.0
    full_alpha: float = 1.0
    full_beta: float = 1.0
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "llama"  # llama | linear_llama | hybrid | minimax
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    vocab_size: int = 259
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    layer_pattern: str = ""  # hybrid, minimax: one letter per layer, L linear, A softmax
    linear_attn: LinearAttnConfig = field(default_factory=LinearAttnConfig)
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    attn_head_dim: int = 0  # 0 = dim // n_heads
    hf: str = ""  # a local Hugging Face model folder: weights and the keys above come from it
    impl: str = "native"  # native (seqshard's model code) | transformers (generic wrap)
    hf_arch: str = ""  # the checkpoint's architecture (e.g. LlamaForCausalLM), for export
    # attention patterns per layer (issue #29); the defaults keep every layer full causal
    layer_types: str = ""  # one letter per layer: F full, S sliding window, C chunked ("" = see layer_type)
    sliding_window: int = 0  # sliding layers see their last `sliding_window` tokens, themselves included
    sliding_window_pattern: int = 0  # with no layer_types: every n-th layer full, the others sliding
    attn_chunk_size: int = 0  # chunked layers: a token sees only its own chunk (Llama 4)
    attn_softcap: float = 0.0  # attention scores -> softcap * tanh(scores / softcap) (Gemma 2)
    final_softcap: float = 0.0  # the same on the output logits (Gemma 2 and 3)
    attn_scale: float = 0.0  # softmax scale; 0: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    local_rope_theta: float = 0.0  # RoPE theta of sliding layers, unscaled (Gemma 3); 0: rope_theta
    attn_sinks: bool = False  # a learned sink logit per query head (GPT-OSS)
    block: str = "llama"  # llama | gemma: (1 + w) norms, post-attention/MLP norms, GeLU-tanh, sqrt(dim) embed
    embed_padding_idx: int = -1  # an embedding row that gets no gradient (HF's padding_idx); -1: none
    moe: MoEConfig = field(default_factory=MoEConfig)
    minimax: MiniMaxBlockConfig = field(default_factory=MiniMaxBlockConfig)  # arch minimax only

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.dim // self.n_heads

    def layer_type(self, i: int) -> str:
        """Attention kind of layer ``i``: ``layer_types``, else ``sliding_window_pattern``, else
        sliding everywhere when ``sliding_window`` is set (Mistral), chunked with a chunk size."""
        if self.layer_types:
            return LAYER_LETTERS[self.layer_types[i]]
        if self.sliding_window and self.sliding_window_pattern:
            return "full_attention" if (i + 1) % self.sliding_window_pattern == 0 else "sliding_attention"
        if self.sliding_window:
            return "sliding_attention"
        return "chunked_attention" if self.attn_chunk_size else "full_attention"
