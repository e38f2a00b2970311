"""Range and cross-field checks of a typed spec. Each failure is one :class:`SpecError` line."""
from __future__ import annotations

import math
import os
from pathlib import Path

from .spec import SpecError

MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_DIM = 2**24
MAX_PARAMS = 10**13
MAX_TOKENS = 2**31 - 1

ARCHS = ("llama", "linear_llama", "hybrid", "minimax")
DECAYS = ("none", "fixed", "data")
SOFTMAX_SP = ("ulysses", "ring", "allgather", "usp")
LINEAR_SP = ("lasp1", "lasp2")
SP_METHODS = ("none", *SOFTMAX_SP, *LINEAR_SP, "adaptive")
LAYOUTS = ("auto", "zigzag", "contiguous", "stream")
BATCHING = ("window", "pack", "decompose")
PACK_METHODS = ("bfd", "ffd", "spfhp", "greedy")
SCHEDULES = ("uniform", "grow_p2", "grow_linear", "shrink")
LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "slurm", "srun")


def _one_of(path, value, choices):
    if value not in choices:
        raise SpecError(path, f"{value!r} is not one of {', '.join(choices)}")


def _positive(path, value, minimum=1):
    if value < minimum:
        raise SpecError(path, f"must be >= {minimum}, got {value}")


def _check_model(m):
    _one_of("model.arch", m.arch, ARCHS)
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.attn_head_dim", m.attn_head_dim, 0)
    if m.dim % m.n_heads and not m.attn_head_dim:
        raise SpecError("model.dim", f"{m.dim} is not divisible by model.n_heads {m.n_heads}")
    if m.head_dim % 2:
        raise SpecError("model.dim", f"head dim {m.head_dim} (dim / n_heads) must be even for RoPE")
    if m.n_heads % m.n_kv_heads:
        raise SpecError("model.n_kv_heads", f"{m.n_kv_heads} does not divide model.n_heads {m.n_heads}")
    if m.vocab_size < 259 and not m.hf:  # an HF model is checked against its tokenizer
        raise SpecError("model.vocab_size", f"{m.vocab_size} is smaller than the byte tokenizer's 259")
    if m.rope_theta <= 0:
        raise SpecError("model.rope_theta", f"must be > 0, got {m.rope_theta}")
    from .rope_spec import check_rope

    check_rope(m)
    _one_of("model.linear_attn.decay", m.linear_attn.decay, DECAYS)
    if m.arch in ("hybrid", "minimax"):
        if len(m.layer_pattern) != m.n_layers or set(m.layer_pattern) - set("LA"):
            raise SpecError("model.layer_pattern", f"{m.layer_pattern!r} must be {m.n_layers} letters "
                            "of L (linear) and A (softmax), one per layer")
    elif m.layer_pattern:
        raise SpecError("model.layer_pattern", f"only used with model.arch: hybrid or minimax, not {m.arch}")


def _check_data(d, dp):
    _one_of("data.batching", d.batching, BATCHING)
    _one_of("data.pack_method", d.pack_method, PACK_METHODS)
    _one_of("data.curriculum.schedule", d.curriculum.schedule, SCHEDULES)
    _positive("data.curriculum.cycles", d.curriculum.cycles)
    _positive("data.max_seq_len", d.max_seq_len, 2)
    _positive("data.tokens_per_step", d.tokens_per_step)
    _positive("data.max_documents", d.max_documents, 0)
    if d.micro_batch_tokens and d.micro_batch_tokens < d.max_seq_len:
        raise SpecError("data.micro_batch_tokens", f"{d.micro_batch_tokens} is below data.max_seq_len "
                        f"{d.max_seq_len}: one sequence must fit in a micro-batch")
    rows = d.tokens_per_step // d.max_seq_len
    if d.tokens_per_step % d.max_seq_len or rows % dp:
        raise SpecError("data.tokens_per_step", f"{d.tokens_per_step} is not a multiple of "
                        f"max_seq_len x dp = {d.max_seq_len} x {dp} = {d.max_seq_len * dp}")
    if d.batching == "decompose":
        if d.max_seq_len & (d.max_seq_len - 1) or d.min_seq_len & (d.min_seq_len - 1):
            raise SpecError("data.max_seq_len", f"decompose needs powers of two for max_seq_len and "
                            f"min_seq_len, got {d.max_seq_len} and {d.min_seq_len}")
        if not 1 <= d.min_seq_len <= d.max_seq_len:
            raise SpecError("data.min_seq_len", f"{d.min_seq_len} must be in [1, max_seq_len={d.max_seq_len}]")


def _check_heads(p, m):
    sp = p.sp
    if p.sp_method == "ulysses" and m.n_heads < sp:
        raise SpecError("parallel.sp", f"ulysses needs model.n_heads {m.n_heads} >= sp {sp} (heads are split, "
                        "unevenly when sp does not divide them); use sp_method: ring or usp (with "
                        "parallel.ulysses dividing the heads) to go past the head count")
    if p.sp_method == "ulysses" and m.n_kv_heads % sp and sp % m.n_kv_heads:
        raise SpecError("parallel.sp", f"ulysses needs model.n_kv_heads {m.n_kv_heads} and sp {sp} "
                        "to divide one another (kv heads are replicated up to sp)")
    if p.sp_method == "usp":
        if p.ulysses == 1:
            raise SpecError("parallel.ulysses", "1 (the default) leaves usp a plain ring: set the Ulysses degree "
                            f"inside sp (a divisor of {sp} above 1), or use sp_method: ring")
        if sp % p.ulysses:
            raise SpecError("parallel.ulysses", f"{p.ulysses} does not divide parallel.sp {sp}")
        if m.n_heads % p.ulysses:
            raise SpecError("parallel.ulysses", f"{p.ulysses} does not divide model.n_heads {m.n_heads}")
        if m.n_kv_heads % p.ulysses and p.ulysses % m.n_kv_heads:
            raise SpecError("parallel.ulysses", f"{p.ulysses} and model.n_kv_heads {m.n_kv_heads} must "
                            "divide one another")
    elif p.ulysses != 1:
        raise SpecError("parallel.ulysses", f"only used with sp_method: usp, not {p.sp_method}")


def _check_parallel(p, m, world_size):
    _one_of("parallel.sp_method", p.sp_method, SP_METHODS)
    _one_of("parallel.layout", p.layout, LAYOUTS)
    _one_of("parallel.softmax_method", p.softmax_method, SOFTMAX_SP)
    _one_of("parallel.planner.solver", p.planner.solver, ("greedy", "milp"))
    if p.planner.max_phases not in (1, 2):
        raise SpecError("parallel.planner.max_phases", f"{p.planner.max_phases!r} is not 1 or 2")
    _positive("parallel.sp", p.sp)
    if not 0 < p.planner.time_limit_s <= 60:
        raise SpecError("parallel.planner.time_limit_s", f"must be in (0, 60] seconds per step, got "
                        f"{p.planner.time_limit_s}")
    if world_size % p.sp:
        raise SpecError("parallel.sp", f"{p.sp} does not divide world size {world_size}")
    if p.sp_method == "none" and p.sp != 1:
        raise SpecError("parallel.sp_method", f"none cannot run sp {p.sp}; choose ulysses, ring, allgather, usp"
                        " (softmax) or lasp1, lasp2 (linear attention)")
    if p.sp_method in LINEAR_SP and m.arch == "llama":
        raise SpecError("parallel.sp_method", f"{p.sp_method} parallelizes linear attention; model.arch llama "
                        "is softmax-only (use ulysses/ring/allgather/usp, or arch linear_llama/hybrid)")
    if p.sp_method in SOFTMAX_SP and m.arch != "llama":
        raise SpecError("parallel.sp_method", f"{p.sp_method} is for softmax attention; model.arch "
                        f"{m.arch} needs lasp1 or lasp2 (hybrid softmax layers use parallel.softmax_method)")
    if p.sp_method == "adaptive":
        if m.arch != "llama":
            raise SpecError("parallel.sp_method", "adaptive runs Ulysses/Ring/USP inside groups: model.arch must be llama")
        if p.max_sp < 1 or p.max_sp > world_size:  # any size: groups need not be powers of two
            raise SpecError("parallel.max_sp", f"{p.max_sp} must be between 1 and world size {world_size}")
        from seqshard.parallel.hardware import PROFILES

        if p.planner.profile.endswith(".json"):  # a `seqshard calibrate --spec --out` file
            from seqshard.report.calibration_file import CalibrationError, load_calibration

            try:
                load_calibration(p.planner.profile, m)
            except (OSError, KeyError, TypeError, ValueError) as err:  # CalibrationError is a ValueError
                why = err if isinstance(err, CalibrationError) else f"not a calibration file ({err})"
                raise SpecError("parallel.planner.profile", str(why)) from None
        else:
            _one_of("parallel.planner.profile", p.planner.profile, tuple(sorted(PROFILES)))
        _positive("parallel.planner.memory_tokens", p.planner.memory_tokens, 0)
    if p.sp_method in ("ring", "usp") and p.layout == "stream":
        raise SpecError("parallel.layout", f"{p.sp_method} shards each document; use zigzag or contiguous")
    if p.sp_method in LINEAR_SP and m.arch in ("hybrid", "minimax") and p.softmax_method in ("ring", "usp"):
        raise SpecError("parallel.softmax_method", f"{p.softmax_method} shards each document, but LASP "
                        "uses the stream layout; use allgather or ulysses for the softmax layers")
    if p.sp_method in LINEAR_SP and p.layout not in ("auto", "stream"):
        raise SpecError("parallel.layout", f"{p.sp_method} carries state along the stream; use stream or auto")
    _check_heads(p, m)
    _check_ulysses_layer(p, m, world_size)


COMM_DTYPES = ("fp32", "bf16")


def _ulysses_degrees(p, m, world_size) -> list:
    """The Ulysses group sizes the copy-free layer can run under ``p`` (empty: it never runs)."""
    if p.sp_method == "ulysses" or (p.sp_method in LINEAR_SP and p.softmax_method == "ulysses"):
        return [p.sp]
    if p.sp_method == "usp":
        return [p.ulysses]
    if p.sp_method == "adaptive" and m.arch == "llama":
        from seqshard.parallel.planner import allowed_group_sizes

        # a group of s runs even Ulysses when s divides the heads, else USP with gcd(heads, s) (or
        # uneven Ulysses / Ring, which take the unchanged path)
        return sorted({math.gcd(m.n_heads, s) for s in allowed_group_sizes(world_size, p.max_sp, m.n_heads)})
    return []


def _check_ulysses_layer(p, m, world_size):
    """``parallel.ulysses_chunks`` and ``parallel.comm_dtype`` (the copy-free Ulysses layer)."""
    _one_of("parallel.comm_dtype", p.comm_dtype, COMM_DTYPES)
    if isinstance(p.ulysses_chunks, str):
        _one_of("parallel.ulysses_chunks", p.ulysses_chunks, ("auto",))
    else:
        _positive("parallel.ulysses_chunks", p.ulysses_chunks)
    from seqshard.parallel.ulysses_layer import wire_dtype_supported

    backend = "nccl" if _cuda_available() else "gloo"
    if not wire_dtype_supported(backend, p.comm_dtype):
        raise SpecError("parallel.comm_dtype", f"{p.comm_dtype} cannot be sent by the {backend} backend's "
                        "all-to-all; use fp32")
    if p.ulysses_chunks == 1 and p.comm_dtype == "fp32":
        return
    key = "parallel.ulysses_chunks" if p.ulysses_chunks != 1 else "parallel.comm_dtype"
    degrees = [u for u in _ulysses_degrees(p, m, world_size) if u > 1]
    if not degrees:
        raise SpecError(key, f"only used by the Ulysses all-to-all (sp_method ulysses, usp, adaptive, or "
                        f"softmax_method ulysses), not sp_method {p.sp_method} with sp {p.sp}")
    if m.impl != "native":
        raise SpecError(key, f"only used by seqshard's native attention layer; model.impl {m.impl} runs "
                        "the transformers attention through the unchanged Ulysses exchange")
    if p.sp_method == "ulysses" and m.n_heads % p.sp:
        raise SpecError(key, f"model.n_heads {m.n_heads} over sp {p.sp} is the uneven-heads Ulysses, which "
                        "takes the unchanged exchange; leave ulysses_chunks: 1 and comm_dtype: fp32")
    for u in degrees:
        if m.n_heads % u == 0 and isinstance(p.ulysses_chunks, int) and (m.n_heads // u) % p.ulysses_chunks:
            raise SpecError("parallel.ulysses_chunks", f"{p.ulysses_chunks} does not divide the "
                            f"{m.n_heads // u} query heads per rank (model.n_heads {m.n_heads} over a "
                            f"Ulysses degree of {u}); use a divisor of {m.n_heads // u}, or auto")


def _check_ulysses_checkpointing(spec):
    """Full and lean checkpointing run the unchanged Ulysses path: its chunk and wire keys would do nothing."""
    p = spec.parallel
    mode = spec.train.activation_checkpointing
    if mode not in ("full", "lean") or (p.ulysses_chunks == 1 and p.comm_dtype == "fp32"):
        return
    key = "parallel.ulysses_chunks" if p.ulysses_chunks != 1 else "parallel.comm_dtype"
    raise SpecError(key, f"the copy-free Ulysses layer is not used under train.activation_checkpointing: {mode} "
                    "(it takes the unchanged exchange); use selective or none, or leave "
                    "ulysses_chunks: 1 and comm_dtype: fp32")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_train(t):
    _positive("train.steps", t.steps)
    if t.lr <= 0:
        raise SpecError("train.lr", f"must be > 0, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise SpecError("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _positive("train.warmup_steps", t.warmup_steps, 0)
    if t.weight_decay < 0:
        raise SpecError("train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    if t.grad_clip < 0:
        raise SpecError("train.grad_clip", f"must be >= 0 (0 disables), got {t.grad_clip}")
    _one_of("train.dtype", t.dtype, ("float32", "bfloat16"))
    _positive("train.log_every", t.log_every)
    _positive("train.checkpoint_every", t.checkpoint_every, 0)
    if not 0 < t.collective_timeout_s <= MAX_TIMEOUT_S:
        raise SpecError("train.collective_timeout_s", f"must be in (0, {MAX_TIMEOUT_S}] seconds (a week), "
                        f"got {t.collective_timeout_s}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise SpecError(f"train.{key}", f"must be in [0, 1) (an Adam moment decay), got {getattr(t, key)}")
    _one_of("train.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
    _positive("train.max_nonfinite_in_row", t.max_nonfinite_in_row)
    _positive("train.keep_checkpoints", t.keep_checkpoints, 0)
    if t.on_nonfinite == "skip" and t.engine == "deepspeed":
        raise SpecError("train.on_nonfinite", "skip needs an engine that can drop an update; DeepSpeed applies it "
                        "before the gradient norm is known: use stop, or train.engine: torch / fsdp2")
    _one_of("train.engine", t.engine, ("torch", "fsdp2", "deepspeed"))
    if t.zero_stage not in (0, 1, 2, 3):
        raise SpecError("train.zero_stage", f"{t.zero_stage} is not a ZeRO stage (0, 1, 2, 3)")
    if t.zero_stage and t.engine != "deepspeed":
        raise SpecError("train.zero_stage", "ZeRO needs train.engine: deepspeed")
    if t.ds_config and t.engine != "deepspeed":
        raise SpecError("train.ds_config", "only used with train.engine: deepspeed")
    if not t.output_dir:
        raise SpecError("train.output_dir", "must not be empty")
    _check_output_dir(t.output_dir)


def _check_output_dir(output_dir):
    """The folder is a folder (or can be made one) that this user can write."""
    path = Path(output_dir).absolute()
    if path.exists() and not path.is_dir():
        raise SpecError("train.output_dir", f"{output_dir} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise SpecError("train.output_dir", f"{existing} is a file, so {output_dir} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError("train.output_dir", f"{existing} is not writable by this user")


def _check_sizes(spec):
    """Values no run can have (a typo, an extra zero): refused before the memory model is asked."""
    m, d = spec.model, spec.data
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "attn_head_dim"):
        if getattr(m, key) > MAX_DIM:
            raise SpecError(f"model.{key}", f"{getattr(m, key)} is beyond any model (at most {MAX_DIM})")
    params = m.n_layers * (4 * m.dim * m.dim + 3 * m.dim * m.ffn_dim) + 2 * m.vocab_size * m.dim
    if params > MAX_PARAMS:
        raise SpecError("model.dim", f"the model would have about {params:.2e} parameters (more than "
                        f"{MAX_PARAMS:.0e}); check model.dim, n_layers and ffn_dim")
    for key in ("max_seq_len", "tokens_per_step", "micro_batch_tokens", "min_seq_len"):
        if getattr(d, key) > MAX_TOKENS:
            raise SpecError(f"data.{key}", f"{getattr(d, key)} tokens is beyond what positions and "
                            f"cu_seqlens (int32 offsets per micro-batch) can index ({MAX_TOKENS})")
    if spec.train.steps > 10**9:
        raise SpecError("train.steps", f"{spec.train.steps} steps is beyond any run (at most 1e9)")


def _check_launch(launch):
    _one_of("launch.launcher", launch.launcher, LAUNCHERS)
    _positive("launch.nproc_per_node", launch.nproc_per_node)
    _positive("launch.nnodes", launch.nnodes)
    if not 0 <= launch.node_rank < launch.nnodes:
        raise SpecError("launch.node_rank", f"{launch.node_rank} is not in [0, nnodes={launch.nnodes})")
    if not 0 < launch.master_port < 65536:
        raise SpecError("launch.master_port", f"{launch.master_port} is not a TCP port")


def _check_engine(spec):
    if spec.train.offload_params and spec.train.engine != "fsdp2":
        raise SpecError("train.offload_params", "parameter offload needs train.engine: fsdp2")
    if spec.train.async_checkpoint and spec.train.engine == "deepspeed":
        raise SpecError("train.async_checkpoint", "DeepSpeed saves its own checkpoints; use train.engine: torch or fsdp2")
    if spec.train.engine != "deepspeed":
        return
    if spec.data.batching != "window":
        raise SpecError("train.engine", "deepspeed needs the same micro-batch count on every replica: "
                        f"use data.batching: window (not {spec.data.batching}) or train.engine: torch")
    if spec.parallel.sp_method == "adaptive":
        raise SpecError("train.engine", "adaptive scattering regroups ranks every step; use train.engine: torch")


def _check_tokenizer_vocab(spec):
    """``data.tokenizer: PATH``: the folder is readable and its vocabulary fits the model's."""
    d, m = spec.data, spec.model
    if d.tokenizer == "byte":
        return
    from seqshard.data.hf_tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(d.tokenizer)
    except (TokenizerError, ValueError, OSError) as err:
        raise SpecError("data.tokenizer", str(err)) from None
    if tok.vocab_size > m.vocab_size:
        raise SpecError("data.tokenizer", f"{d.tokenizer} has {tok.vocab_size} tokens, more than "
                        f"model.vocab_size {m.vocab_size}; use a matching tokenizer or a larger model")


def validate(spec, world_size: int):
    if spec.seed < 0:
        raise SpecError("seed", f"must be >= 0, got {spec.seed}")
    _check_sizes(spec)
    _check_model(spec.model)
    _check_launch(spec.launch)
    _check_parallel(spec.parallel, spec.model, world_size)
    _check_train(spec.train)
    _check_data(spec.data, spec.dp(world_size))
    _check_engine(spec)
    _check_ulysses_checkpointing(spec)
    from .datacheck import check_data
    from .hf_checks import check_hf
    from .long_eval_checks import check_long_eval
    from .memory_checks import check_fits, check_memory_keys
    from .validate_extras import check_extras

    from .moe_checks import check_moe

    check_moe(spec, world_size)
    check_extras(spec)
    check_data(spec)
    _check_tokenizer_vocab(spec)
    check_hf(spec)
    check_memory_keys(spec.train)
    check_fits(spec, world_size)
    check_long_eval(spec, world_size)
