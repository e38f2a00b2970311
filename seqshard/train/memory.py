"""Activation memory options applied to an unchanged model from outside (like torchtitan's apply_ac).

- ``activation_checkpointing``: per transformer block, non-reentrant ``torch.utils.checkpoint``.
  ``full`` recomputes the whole block in backward, the token mixer (SP attention / LASP) and its
  collectives included, so ``COMM_LOG`` counts those bytes twice. ``selective`` recomputes the
  block too but keeps the mixer's own saved tensors (q, k, v, output, lse or LASP states): the
  mixer call runs under identity ``saved_tensors_hooks`` (the innermost hooks win over the
  checkpoint's), its output is stashed, and the recomputation takes the stashed output instead of
  calling the mixer again. Backward therefore repeats no attention collective. ``lean`` keeps only
  each attention kernel call's output and lse (``kernels.attention.KernelStash``): the block,
  q/k/v and the Ulysses exchanges are recomputed, the O(L^2) kernel is not (ring, USP and LASP
  mixers, which do not go through ``attention()``, are recomputed whole, as with ``full``).
- ``offload_activations``: the checkpointed block inputs (saved by the checkpoint outside its own
  hooks) go through :func:`offload_hooks`: on CUDA a copy into a pinned host buffer on a side
  stream and back before use; on the CPU a no-op (the tensor already lives in host memory, it is
  kept as it is: no copy).
- ``mlp_tiles``: each SwiGLU MLP runs over sequence tiles, each tile checkpointed, so at most one
  tile's ``[tile, ffn_dim]`` intermediates exist, forward and backward. ``0`` = automatic:
  ``ceil(tokens / dim)`` tiles (ALST's rule: tiles of about ``dim`` tokens, so a tile's
  ``[tile, ffn_dim]`` intermediates are the size of one ``[dim, ffn_dim]`` weight), ``1`` = untiled.

Forwards are patched per instance (``module.forward = ...``) so parameter names, state dicts and
checkpoints are unchanged.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

MIXER_FNS = ("attention_fn", "linear_attention_fn")


def mlp_tile_count(tokens: int, dim: int, mlp_tiles: int) -> int:
    """Tiles for ``tokens`` local tokens: ``mlp_tiles``, or with 0 ``ceil(tokens / dim)``."""
    n = mlp_tiles if mlp_tiles > 0 else math.ceil(tokens / max(1, dim))
    return max(1, min(n, tokens))


def tiled_mlp_forward(mlp, x, mlp_tiles: int):
    """``mlp(x)`` over sequence tiles of ``x`` ``[T, dim]`` (or transformers' ``[1, T, dim]``),
    each tile checkpointed."""
    seq = x.dim() - 2  # the token dimension
    n = mlp_tile_count(x.shape[seq], x.shape[-1], mlp_tiles)
    if n <= 1:
        return mlp(x)
    # split (one SplitWithSizesBackward: the tile gradients are concatenated once), not
    # tensor_split (a SliceBackward per tile, each zero-filling and adding a whole [T, dim]
    # gradient: n full-size fills and adds per layer, O(T^2 / dim) bytes with mlp_tiles 0)
    tiles = x.split(tile_sizes(x.shape[seq], n), dim=seq)
    if not torch.is_grad_enabled():
        return torch.cat([mlp(t) for t in tiles], dim=seq)
    return torch.cat([checkpoint(mlp, t, use_reentrant=False) for t in tiles], dim=seq)


def tile_sizes(tokens: int, n: int) -> list[int]:
    """``n`` tile lengths summing to ``tokens``, the first ``tokens % n`` one longer (as ``tensor_split``)."""
    q, r = divmod(tokens, n)
    return [q + 1] * r + [q] * (n - r)


def _identity(t):
    return t


class _MixerStash:
    """Keeps a block's token-mixer outputs between its checkpointed forward and the recompute."""

    def __init__(self):
        self.outputs, self.mode = [], None

    @contextmanager
    def recording(self):
        self.outputs, self.mode = [], "record"
        try:
            yield
        finally:
            self.mode = None

    @contextmanager
    def replaying(self):
        self.mode = "replay"
        try:
            yield
        finally:
            self.mode = None

    def wrap(self, fn):
        def mixer(*args, **kwargs):  # kwargs: the layer's attention pattern (window, softcap, sinks)
            if self.mode == "replay":  # same value; a leaf so the recompute saves what forward did
                out = self.outputs.pop(0)
                return out.detach().requires_grad_(out.requires_grad)
            if self.mode == "record":
                with saved_tensors_hooks(_identity, _identity):  # keep the mixer's saved tensors
                    out = fn(*args, **kwargs)
                self.outputs.append(out)
                return out
            return fn(*args, **kwargs)

        mixer.seqshard_inner = fn
        return mixer


def offload_hooks(device: torch.device):
    """``saved_tensors_hooks`` moving saved tensors to host memory (CUDA) or a no-op (CPU)."""
    if device.type != "cuda":
        return nullcontext()
    stream = torch.cuda.Stream(device)

    def pack(t):
        if t.device.type != "cuda":
            return t
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            buf.copy_(t, non_blocking=True)
            t.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return t.device, buf, done

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        dev, buf, done = packed
        done.synchronize()
        return buf.to(dev, non_blocking=True)

    return saved_tensors_hooks(pack, unpack)


def token_mixer(block):
    """The module holding a block's attention callable: seqshard's ``block.attn``, or in a wrapped
    transformers layer the submodule that carries ``attention_fn`` (its ``*Attention``)."""
    if hasattr(block, "attn"):
        return block.attn
    return next(m for m in block.modules() if any(hasattr(m, name) for name in MIXER_FNS))


def _checkpointed_forward(block, mode: str, offload: bool):
    inner = block.forward
    if mode in ("full", "lean"):
        # the copy-free Ulysses layer keeps its per-chunk graphs (q, k, v, output) on its autograd
        # node, out of the checkpoint's reach: under full and lean checkpointing the layer takes
        # the unchanged Ulysses path, whose saved tensors the checkpoint drops and recomputes
        mixer = token_mixer(block)
        if getattr(mixer, "sp_layer_fn", None) is not None:
            mixer.sp_layer_fn = None
    stash = None
    if mode == "lean":  # the attention kernels' out and lse, kept between forward and recompute
        from seqshard.kernels.attention import KernelStash

        stash = KernelStash()
    elif mode == "selective":  # the token mixer's whole output and saved tensors
        stash = _MixerStash()
        mixer = token_mixer(block)
        # a whole-layer SP callable (copy-free Ulysses) is stashed instead of the attention
        # callable it calls on its fallback path, so each mixer call is stashed once
        names = ("sp_layer_fn",) if getattr(mixer, "sp_layer_fn", None) is not None else MIXER_FNS
        for name in names:
            if hasattr(mixer, name) and not hasattr(getattr(mixer, name), "seqshard_inner"):
                setattr(mixer, name, stash.wrap(getattr(mixer, name)))

    def contexts():
        return (stash.recording(), stash.replaying()) if stash else (nullcontext(), nullcontext())

    def forward(x, *args, **kwargs):  # seqshard blocks: (x, positions, ctx); transformers layers: (h, **kw)
        if not torch.is_grad_enabled():
            return inner(x, *args, **kwargs)
        with offload_hooks(x.device) if offload else nullcontext():
            return checkpoint(inner, x, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return forward


def apply_memory_options(model, train_spec):
    """Install tiled MLP and per-block checkpointing/offload per ``train_spec``; returns ``model``.

    Blocks are the entries of ``model.layers``; each has ``.mlp`` and a token mixer holding its
    attention callable (``.attn``, or a transformers ``*Attention`` submodule in the generic wrap).
    """
    ac = train_spec.activation_checkpointing
    tiles = train_spec.mlp_tiles
    for block in model.layers:
        if tiles != 1:
            mlp = block.mlp
            plain = type(mlp).forward.__get__(mlp)
            mlp.forward = lambda x, _plain=plain: tiled_mlp_forward(_plain, x, tiles)
        if ac != "none":
            block.forward = _checkpointed_forward(block, ac, train_spec.offload_activations)
    return model
