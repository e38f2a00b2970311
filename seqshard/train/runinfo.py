"""What a run is: the engine in use and its key settings, the launch command, the resolved spec.

Logged in the first lines, written to ``run.json`` and given to the loggers as run config, so a
DeepSpeed or FSDP2 run says so (ZeRO stage, precision, reshard policy) wherever one looks.
"""
from __future__ import annotations

from .loggers import launch_command


def engine_settings(spec, engine) -> dict:
    """The engine's key settings; ZeRO stage as DeepSpeed itself reports it (ds_config may set it)."""
    t = spec.train
    info = {"engine": t.engine, "precision": t.dtype}
    if t.engine == "deepspeed":
        inner = getattr(engine, "engine", None)
        stage = inner.zero_optimization_stage() if hasattr(inner, "zero_optimization_stage") else t.zero_stage
        info.update(zero_stage=int(stage), ds_config=t.ds_config or "(built from the spec)")
    if t.engine == "fsdp2":
        info.update(reshard_after_forward=t.reshard_after_forward, offload_params=t.offload_params)
    return info


def describe_engine(settings: dict) -> str:
    extra = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items() if k != "engine")
    return f"engine {settings['engine']} ({extra})"


def run_config(spec, engine, launcher: str) -> dict:
    return {"spec": spec.to_dict(), "launch_command": launch_command(), "launcher": launcher,
            "engine": engine_settings(spec, engine)}
