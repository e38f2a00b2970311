"""Predicted peak memory per rank of a training step (pure functions of sizes; no torch).

Terms, for ``n`` local tokens (``L / sp``), ``b`` bytes per activation element, ``d`` = dim,
``d_kv`` = kv heads x head_dim, ``f`` = ffn_dim, ``l`` layers, ``V`` = vocabulary:

- model states: parameters, gradients and AdamW state (fp32 master + two moments) per
  parameter, divided over the ranks that shard them by the ZeRO stage (stage 1 shards the
  optimizer state, 2 also the gradients, 3 also the parameters; Rajbhandari et al. 2020).
  DeepSpeed and fsdp2 shard over every rank (dp x sp). With the states offloaded to the host
  (fsdp2 ``offload_params``) the device holds two blocks' unsharded parameters and gradients
  (the one in use and the one prefetched) and the embedding matrix;
- saved activations per layer and token (elements), alive for the whole step:
  ``none``: ``6 d + 2 d_kv + 4 f`` (block input, both norm outputs, q/k/v, attention output,
  the SwiGLU's w1, silu, w3 and product); with a tiled MLP the ``4 f`` becomes 0 (each tile is
  recomputed); ``selective``: block input + q, k, v, output = ``3 d + 2 d_kv``;
  ``lean``: block input + attention output = ``2 d`` (ring/USP/LASP: ``d``, as ``full``);
  ``full``: the block input ``d``; offload (CUDA only) moves the block input to the host;
- two phases that never overlap, so the peak holds the larger of them:
  - the backward of one block (recomputed under checkpointing): ``WORK_FACTOR x`` that block's
    activations (``6 d + 2 d_kv`` + ``4 f`` for one MLP tile) + the residual stream and its
    gradient (``2 d``), the attention workspace ``ATTN_WORKSPACE x (d + 2 d_kv)`` and the SP
    communication buffers (send + receive of q/k/v/o for Ulysses and USP, two K/V blocks in
    flight + fp32 accumulators for ring, the gathered K/V for all-gather);
  - the loss (``kernels/cross_entropy.py``): the final hidden states, their fp32 gradient
    ``n d``, the weight's fp32 gradient and fp32 copy ``V d``, and one ``[chunk, vocab]`` logits
    block of ``LOSS_CHUNK_BYTES`` (never ``[L, vocab]``);
- a fixed runtime: the process's libraries and heap. On CPU the measured peak is the process's
  RSS, so a CPU profile carries it (``RUNTIME_BYTES['cpu']``), and, at sp > 1, the RSS that
  grows beyond the torch allocator's live tensors (``CPU_SP_EXTRA`` blocks of activations,
  fitted to bench/capacity.py's sp=4 runs; its cause is not pinned down: not malloc arenas);
  on CUDA ``max_memory_allocated`` excludes both.

The constants are measured on this machine (bench/capacity.py; ``WORK_FACTOR`` from the torch
profiler's memory timeline of a tiny selective step: the tensors alive at the backward's peak
are 1.2 x one block's activations, not the 2 x an upper bound would give).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

WORK_FACTOR = 1.2  # a block's activations alive at once in its backward (measured, module doc)
ATTN_WORKSPACE = 2.0  # per-token elements x (d + 2 d_kv) of attention scratch
LOSS_CHUNK_BYTES = 64 * 2**20  # linear_cross_entropy's logits block (kernels/cross_entropy.py budget)
RUNTIME_BYTES = {"cpu": 540 * 2**20, "cuda": 0}  # cpu: rank RSS without activations (bench/capacity.py)
CPU_SP_EXTRA = 0.8  # cpu, sp > 1: RSS beyond the allocator's tensors, in blocks of activations (measured)


@dataclass(frozen=True)
class MemoryConfig:
    """What the prediction needs besides the model shape (plain numbers, filled from a spec)."""
    sp: int = 1
    sp_method: str = "none"
    dp: int = 1  # ranks the model states are sharded over (ZeRO stage > 0, fsdp2)
    zero_stage: int = 0
    act_bytes: int = 4  # 4 fp32, 2 bf16 activations
    param_bytes: int = 4  # weights as stored on the device
    checkpointing: str = "none"  # none | full | selective | lean
    offload: bool = False
    mlp_tiles: int = 1  # 1 untiled, 0 auto (ceil(n / dim)), N tiles
    device: str = "cpu"  # cpu | cuda: whether offload frees device memory, runtime constant
    offload_states: bool = False  # parameters, gradients and optimizer states on the host (fsdp2)


def n_params(m) -> int:
    """Parameters of the model shape ``m`` (a ModelConfig): embeddings, blocks, norms, head."""
    kv = m.n_kv_heads * m.head_dim
    softmax = 2 * m.dim * m.dim + 2 * m.dim * kv
    linear = 4 * m.dim * m.dim + m.head_dim + (m.dim * m.n_heads + m.n_heads if m.linear_attn.decay == "data" else 0)
    pattern = {"llama": "A" * m.n_layers, "linear_llama": "L" * m.n_layers}.get(m.arch, m.layer_pattern)
    blocks = sum(softmax if c == "A" else linear for c in pattern) + m.n_layers * (3 * m.dim * m.ffn_dim + 2 * m.dim)
    head = 0 if m.tie_embeddings else m.vocab_size * m.dim
    return m.vocab_size * m.dim + blocks + m.dim + head


def block_params(m) -> int:
    """Parameters of the largest transformer block (what a sharded engine gathers at once)."""
    kv = m.n_kv_heads * m.head_dim
    return 2 * m.dim * m.dim + 2 * m.dim * kv + 3 * m.dim * m.ffn_dim + 2 * m.dim


def state_bytes(m, c: MemoryConfig) -> float:
    """Parameters, gradients and AdamW state (3 fp32 words when weights are bf16, else 2)."""
    if c.offload_states:  # on device: two gathered blocks (weights + gradients) and the embedding
        return (2 * block_params(m) * 2 + m.vocab_size * m.dim) * c.param_bytes
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
    """Saved activations, then the two phases: a block's backward and the loss (module doc)."""
    b, d, f, V = c.act_bytes, m.dim, m.ffn_dim, m.vocab_size
    dkv = m.n_kv_heads * m.head_dim
    tiled = c.mlp_tiles != 1
    mlp_saved = 0 if tiled else 4 * f
    kernel_kept = c.sp_method in ("none", "ulysses", "allgather") or c.sp <= 1  # lean: out (+ lse) kept
    per_layer = {"none": 6 * d + 2 * dkv + mlp_saved, "selective": 3 * d + 2 * dkv, "full": d,
                 "lean": 2 * d if kernel_kept else d}[c.checkpointing]
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
    cpu_extra = CPU_SP_EXTRA * block * b if c.device == "cpu" and c.sp > 1 else 0.0
    weight_copy = V * d * 4 * (1 if c.param_bytes == 4 else 2)  # fp32 gradient (+ fp32 copy of bf16 weights)
    loss = n * d * (b + 4) + weight_copy + min(LOSS_CHUNK_BYTES, n * V * 4)
    return {"saved_activations": saved, "backward_working_set": work, "attention_workspace": attn,
            "comm_buffers": comm, "cpu_sp_rss": cpu_extra, "loss_phase": loss}


def predict_peak(m, seq_len: int, c: MemoryConfig) -> dict:
    """Per-rank bytes by term and ``total`` for one sequence of ``seq_len`` tokens over ``c.sp``.

    ``total`` = model states + runtime + saved activations + the larger of the backward phase
    (working set + attention workspace + comm buffers) and the loss phase."""
    n = math.ceil(seq_len / c.sp)
    act = activation_bytes(m, n, c)
    terms = {"model_states": state_bytes(m, c), **act, "runtime": RUNTIME_BYTES.get(c.device, 0)}
    backward = (act["backward_working_set"] + act["attention_workspace"] + act["comm_buffers"]
                + act["cpu_sp_rss"])
    terms["total"] = (terms["model_states"] + terms["runtime"] + act["saved_activations"]
                      + max(backward, act["loss_phase"]))
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
    # the torch engine replicates the states; DeepSpeed's ZeRO and fsdp2 shard over every rank (dp x sp)
    stage, shards = {"torch": (0, 1), "fsdp2": (3, world_size)}.get(t.engine, (t.zero_stage, world_size))
    return MemoryConfig(sp=sp, sp_method=p.sp_method, dp=max(1, shards), zero_stage=stage,
                        act_bytes=2 if t.dtype == "bfloat16" else 4, param_bytes=4,
                        checkpointing=t.activation_checkpointing, offload=t.offload_activations,
                        mlp_tiles=t.mlp_tiles, device=device,
                        offload_states=t.engine == "fsdp2" and t.offload_params)


def format_breakdown(terms: dict) -> str:
    phase = {"backward_working_set": " (backward phase)", "attention_workspace": " (backward phase)",
             "comm_buffers": " (backward phase)", "cpu_sp_rss": " (backward phase, CPU RSS at sp > 1)",
             "loss_phase": " (loss phase)",
             "total": " = states + runtime + saved + the larger phase"}
    return "\n".join(f"  {k:<22} {v / 2**20:12.1f} MiB{phase.get(k, '')}" for k, v in terms.items())
