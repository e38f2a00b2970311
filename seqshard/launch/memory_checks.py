"""Checks of the memory keys of ``train:`` and the fit check by the memory model (one line each)."""
from __future__ import annotations

import dataclasses

from seqshard.parallel import memory_model as mm

from .spec import SpecError

CHECKPOINTING = ("none", "full", "selective", "lean")


def check_memory_keys(t):
    if t.activation_checkpointing not in CHECKPOINTING:
        raise SpecError("train.activation_checkpointing",
                        f"{t.activation_checkpointing!r} is not one of {', '.join(CHECKPOINTING)}")
    if t.offload_activations and t.activation_checkpointing == "none":
        raise SpecError("train.offload_activations", "offloads the checkpointed block inputs: set "
                        "train.activation_checkpointing to full, selective or lean")
    if t.mlp_tiles < 0:
        raise SpecError("train.mlp_tiles", f"must be >= 0 (1 untiled, 0 auto), got {t.mlp_tiles}")
    if t.device_memory_gb < 0:
        raise SpecError("train.device_memory_gb", f"must be >= 0 (0 skips the fit check), got {t.device_memory_gb}")


def _hints(spec, c, cap) -> str:
    """The knobs (checkpointing and MLP tiles at this sp; the smallest sp) that would make it fit."""
    L = spec.data.max_seq_len

    def fits(**change):
        return mm.predict_peak(spec.model, L, dataclasses.replace(c, **change))["total"] <= cap

    options = []
    for ac, tiles in (("selective", c.mlp_tiles), ("lean", c.mlp_tiles), ("full", c.mlp_tiles), ("selective", 0),
                      ("lean", 0), ("full", 0)):
        if fits(checkpointing=ac, mlp_tiles=tiles):
            options.append(f"train.activation_checkpointing={ac}" + (" + train.mlp_tiles=0" if tiles == 0 else ""))
            break
    method = c.sp_method if c.sp_method not in ("none", "adaptive") else "ring"
    for label, change in (("", {}), (" + train.activation_checkpointing=full + train.mlp_tiles=0",
                                     {"checkpointing": "full", "mlp_tiles": 0})):
        sp = next((s for s in (2 ** i for i in range(1, 21)) if s > c.sp and fits(sp=s, sp_method=method, **change)), 0)
        if sp:
            options.append(f"parallel.sp={sp}{label}")
            break
    options.append("train.offload_activations=true with checkpointing (frees device memory on CUDA only)")
    return "; ".join(options)


def check_fits(spec, world_size: int):
    """With ``train.device_memory_gb`` set, the longest sequence must fit by the memory model."""
    gb = spec.train.device_memory_gb
    if not gb:
        return
    cap = gb * 2**30
    c = mm.config_from_spec(spec, world_size)
    need = mm.predict_peak(spec.model, spec.data.max_seq_len, c)["total"]
    if need > cap:
        raise SpecError("data.max_seq_len", f"{spec.data.max_seq_len} tokens need {need / 2**30:.2f} GiB per rank "
                        f"by the memory model (train.device_memory_gb={gb:g}); would fit with: "
                        f"{_hints(spec, c, cap)}")
