"""Predicted peak memory per rank of a training step (pure functions of sizes; no torch).

Terms, for ``n`` local tokens (``L / sp``), ``b`` bytes per activation element, ``d`` = dim,
``d_kv`` = kv heads x head_dim, ``f`` = ffn_dim, ``l`` layers:

- model states: parameters, gradients and AdamW state (fp32 master + two moments) per
  parameter, divided over the ``dp`` replicas by the ZeRO stage (stage 1 shards the optimizer
  state, 2 also the gradients, 3 also the parameters), as in Rajbhandari et al. 2020;
- saved activations per layer and token (elements):
  ``none``: ``6 d + 2 d_kv + 4 f`` (block input, both norm outputs, q/k/v, attention output,
  the SwiGLU's w1, silu, w3 and product) — with a tiled MLP the ``4 f`` becomes 0 (each tile is
  recomputed); ``selective``: block input + q, k, v, output = ``3 d + 2 d_kv``;
  ``full``: the block input ``d``; offload (CUDA only) moves the block input to the host;
- the backward's working set: one block recomputed and differentiated at a time:
  ``WORK_FACTOR x`` that block's full activations (``none``'s per-layer count, ``f`` terms for
  one MLP tile when tiled) + the residual stream's gradient;
- attention workspace: out/lse merge buffers and the per-document flash kernel's blocks,
  ``ATTN_WORKSPACE x (d + 2 d_kv)`` per token; SP comm buffers: send + receive of q/k/v/o
  (Ulysses), two K/V blocks in flight + fp32 accumulators (ring), the gathered K/V (allgather);
- loss: linear_cross_entropy's chunk of ``LOSS_CHUNK`` rows x vocab in fp32 (never ``[L, vocab]``);
- a fixed runtime: the process's libraries and heap. On CPU the measured peak is the process's
  RSS, so a CPU profile carries it (``RUNTIME_BYTES['cpu']``, measured: see bench/capacity.py);
  on CUDA ``max_memory_allocated`` excludes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

WORK_FACTOR = 2.0  # a block's activations alive at once in its backward (inputs + their grads)
ATTN_WORKSPACE = 2.0  # per-token elements x (d + 2 d_kv) of attention scratch
LOSS_CHUNK = 4096  # rows of linear_cross_entropy's logits chunk
RUNTIME_BYTES = {"cpu": 540 * 2**20, "cuda": 0}  # cpu: rank RSS of a 2K-token tiny step (bench/capacity.py)


@dataclass(frozen=True)
class MemoryConfig:
    """What the prediction needs besides the model shape (plain numbers, filled from a spec)."""
    sp: int = 1
    sp_method: str = "none"
    dp: int = 1
    zero_stage: int = 0
    act_bytes: int = 4  # 4 fp32, 2 bf16 activations
    param_bytes: int = 4  # weights as stored on the device
    checkpointing: str = "none"  # none | full | selective
    offload: bool = False
    mlp_tiles: int = 1  # 1 untiled, 0 auto (ceil(n / dim)), N tiles
    device: str = "cpu"  # cpu | cuda: whether offload frees device memory, runtime constant


def n_params(m) -> int:
    """Parameters of the model shape ``m`` (a ModelConfig): embeddings, blocks, norms, head."""
    kv = m.n_kv_heads * m.head_dim
    softmax = 2 * m.dim * m.dim + 2 * m.dim * kv
    linear = 4 * m.dim * m.dim + m.head_dim + (m.dim * m.n_heads + m.n_heads if m.linear_attn.decay == "data" else 0)
    pattern = {"llama": "A" * m.n_layers, "linear_llama": "L" * m.n_layers}.get(m.arch, m.layer_pattern)
    blocks = sum(softmax if c == "A" else linear for c in pattern) + m.n_layers * (3 * m.dim * m.ffn_dim + 2 * m.dim)
    head = 0 if m.tie_embeddings else m.vocab_size * m.dim
    return m.vocab_size * m.dim + blocks + m.dim + head


def state_bytes(m, c: MemoryConfig) -> float:
    """Parameters, gradients and AdamW state (3 fp32 words when weights are bf16, else 2)."""
    p = n_params(m)
    params, grads = p * c.param_bytes, p * c.param_bytes
    optim = p * (12 if c.param_bytes == 2 else 8)
    if c.zero_stage >= 1:
        optim /= c.dp
    if c.zero_stage >= 2:
        grads /= c.dp
    if c.zero_stage >= 3:
        params /= c.dp
    return params + grads + optim


def _tile_tokens(n: float, m, tiles: int) -> float:
    if tiles == 1:
        return n
    count = tiles if tiles > 0 else math.ceil(n / m.dim)
    return n / max(1, count)


def activation_bytes(m, n: float, c: MemoryConfig) -> dict:
    """Saved activations, backward working set, attention workspace, comm buffers, loss chunk."""
    b, d, f = c.act_bytes, m.dim, m.ffn_dim
    dkv = m.n_kv_heads * m.head_dim
    tiled = c.mlp_tiles != 1
    mlp_saved = 0 if tiled else 4 * f
    per_layer = {"none": 6 * d + 2 * dkv + mlp_saved, "selective": 3 * d + 2 * dkv, "full": d}[c.checkpointing]
    block_input = d if c.checkpointing != "none" else 0
    if c.offload and c.device == "cuda":
        per_layer -= block_input
    saved = per_layer * n * m.n_layers * b
    t = _tile_tokens(n, m, c.mlp_tiles)
    block = (6 * d + 2 * dkv) * n + 4 * f * t
    work = WORK_FACTOR * block * b + 2 * d * n * b
    attn = ATTN_WORKSPACE * (d + 2 * dkv) * n * b
    comm = {"ulysses": 2 * (2 * d + 2 * dkv) * n * b, "usp": 2 * (2 * d + 2 * dkv) * n * b,
            "ring": 4 * dkv * n * b + 4 * d * n, "allgather": c.sp * 2 * dkv * n * b,
            "lasp2": c.sp * d * m.head_dim * b}.get(c.sp_method, 0.0) if c.sp > 1 else 0.0
    loss = min(n, LOSS_CHUNK) * m.vocab_size * 4 * 2 + n * (d + 2) * b
    embed = n * d * b
    return {"saved_activations": saved, "backward_working_set": work, "attention_workspace": attn,
            "comm_buffers": comm, "loss": loss, "embedding": embed}


def predict_peak(m, seq_len: int, c: MemoryConfig) -> dict:
    """Per-rank bytes by term and ``total`` for one sequence of ``seq_len`` tokens over ``c.sp``."""
    n = math.ceil(seq_len / c.sp)
    terms = {"model_states": state_bytes(m, c), **activation_bytes(m, n, c),
             "runtime": RUNTIME_BYTES.get(c.device, 0)}
    terms["total"] = sum(terms.values())
    return terms


def longest_fitting(m, c: MemoryConfig, capacity_bytes: float, limit: int = 1 << 40) -> int:
    """The longest sequence (a multiple of ``c.sp``) whose predicted peak fits ``capacity_bytes``;
    0 if not even ``sp`` tokens fit. Bisection: the prediction grows with the length."""
    if predict_peak(m, c.sp, c)["total"] > capacity_bytes:
        return 0
    lo, hi = 1, max(2, limit // c.sp)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predict_peak(m, mid * c.sp, c)["total"] <= capacity_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo * c.sp


def config_from_spec(spec, world_size: int, device: str = "cpu") -> MemoryConfig:
    """The :class:`MemoryConfig` of a typed job spec (duck-typed: parallel/ never imports launch/)."""
    p, t = spec.parallel, spec.train
    sp = 1 if p.sp_method == "adaptive" else p.sp
    return MemoryConfig(sp=sp, sp_method=p.sp_method, dp=max(1, world_size // sp), zero_stage=t.zero_stage,
                        act_bytes=2 if t.dtype == "bfloat16" else 4, param_bytes=4,
                        checkpointing=t.activation_checkpointing, offload=t.offload_activations,
                        mlp_tiles=t.mlp_tiles, device=device)


def format_breakdown(terms: dict) -> str:
    return "\n".join(f"  {k:<22} {v / 2**20:12.1f} MiB" for k, v in terms.items())
