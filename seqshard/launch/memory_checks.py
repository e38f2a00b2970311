"""Checks of the memory keys of ``train:`` and the fit check by the memory model (one line each)."""
from __future__ import annotations

from seqshard.parallel import memory_model as mm

from .spec import SpecError

CHECKPOINTING = ("none", "full", "selective")


def check_memory_keys(t):
    if t.activation_checkpointing not in CHECKPOINTING:
        raise SpecError("train.activation_checkpointing",
                        f"{t.activation_checkpointing!r} is not one of {', '.join(CHECKPOINTING)}")
    if t.offload_activations and t.activation_checkpointing == "none":
        raise SpecError("train.offload_activations", "offloads the checkpointed block inputs: set "
                        "train.activation_checkpointing to full or selective")
    if t.mlp_tiles < 0:
        raise SpecError("train.mlp_tiles", f"must be >= 0 (1 untiled, 0 auto), got {t.mlp_tiles}")
    if t.device_memory_gb < 0:
        raise SpecError("train.device_memory_gb", f"must be >= 0 (0 skips the fit check), got {t.device_memory_gb}")


def _hints(spec, world_size, cap) -> str:
    """Which single knob changes would make the longest sequence fit."""
    import dataclasses

    t, p = spec.train, spec.parallel
    tries = []
    if p.sp_method not in ("none", "adaptive") or world_size > 1:
        for sp in (2 * max(1, p.sp), 4 * max(1, p.sp)):
            if sp <= world_size * 4:
                tries.append((f"parallel.sp={sp}", {"sp": sp, "sp_method": p.sp_method if p.sp_method != "none" else "ring"}))
    base = mm.config_from_spec(spec, world_size)
    options = []
    for label, change in tries:
        c = dataclasses.replace(base, **change)
        if mm.predict_peak(spec.model, spec.data.max_seq_len, c)["total"] <= cap:
            options.append(label)
            break
    for label, change in (("train.activation_checkpointing=selective", {"checkpointing": "selective"}),
                          ("train.activation_checkpointing=full", {"checkpointing": "full"}),
                          ("train.mlp_tiles=0", {"mlp_tiles": 0}),
                          ("train.activation_checkpointing=full + train.mlp_tiles=0",
                           {"checkpointing": "full", "mlp_tiles": 0})):
        c = dataclasses.replace(base, **change)
        if mm.predict_peak(spec.model, spec.data.max_seq_len, c)["total"] <= cap:
            options.append(label)
            break
    options.append("train.offload_activations=true (frees device memory on CUDA only)")
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
                        f"{_hints(spec, world_size, cap)}")
