"""Calibration files: a fitted profile saved with the machine kind and model shape it was measured
for, and refused on load when they do not match this run (one line for the user)."""
from __future__ import annotations

import json
import os

import torch


def machine_kind() -> str:
    """What a calibration is only valid on: the accelerator (or CPU architecture) and core count."""
    import platform

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu:{platform.machine()} x{os.cpu_count()}"


def model_shape(cfg) -> dict:
    return {k: int(getattr(cfg, k)) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")}


class CalibrationError(ValueError):
    """A calibration file that does not describe this machine or model; one line for the user."""


def save_profile(profile: dict, path, model=None) -> None:
    """The profile with the machine kind (and the model shape, when given) it was measured for."""
    fields = {k: v for k, v in profile.items() if k != "measured"}
    record = {"profile": fields, "machine": machine_kind(), "model_shape": model_shape(model) if model else None,
              "measured": profile.get("measured")}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def load_calibration(path, model=None):
    """The :class:`HardwareProfile` of a calibration file, refused when it was measured on another
    machine kind or for another model shape (its numbers would not describe this run)."""
    from seqshard.parallel.hardware import HardwareProfile

    with open(path) as f:
        record = json.load(f)
    if record.get("machine") != machine_kind():
        raise CalibrationError(f"{path}: calibrated on {record.get('machine')!r}, this machine is "
                               f"{machine_kind()!r}; run `seqshard calibrate --out {path}` here")
    shape = record.get("model_shape")
    if model is not None and shape is not None and shape != model_shape(model):
        raise CalibrationError(f"{path}: calibrated for model shape {shape}, this run's is {model_shape(model)}; "
                               "recalibrate for this model")
    from seqshard.parallel.hardware import get_profile

    if not str(path).endswith(".json"):
        return HardwareProfile(**record["profile"])
    try:
        return get_profile(str(path))
    except ValueError as err:  # a file from an older seqshard: one line, as the checks above
        raise CalibrationError(str(err)) from None
