"""``model.rope_theta`` / ``model.rope_scaling`` in a job spec: read before typing, checked after.

``model.rope_scaling`` takes transformers' form (``rope_type`` or ``type``, ``default`` = none, the
keys of ``rope_parameters``) and becomes the fields of ``RopeScalingConfig``. ``dynamic`` and
``longrope`` compute their frequencies for ``seq_len``, which defaults to ``data.max_seq_len`` (so
each stage of ``train.stages`` gets its own length's frequencies). For ``model: {hf: PATH}`` both
keys are overrides of config.json's RoPE (hf_spec.py), never conflicts.
"""
from __future__ import annotations

from dataclasses import asdict

from seqshard.models.config import RopeScalingConfig
from seqshard.models.rope_params import RopeError, check_scaling, scaling_from_params

from .spec import DataSpec, SpecError

LENGTH_TYPES = ("dynamic", "longrope")


def parse_rope_scaling(value, max_position_embeddings=None) -> RopeScalingConfig:
    """A spec's ``model.rope_scaling`` mapping -> RopeScalingConfig (SpecError naming the key)."""
    if isinstance(value, RopeScalingConfig):
        return value
    if not isinstance(value, dict):
        raise SpecError("model.rope_scaling", f"expected a mapping, got {type(value).__name__} {value!r}")
    params = dict(value)
    if params.get("type", params.get("rope_type", "none")) in ("none", "default"):
        defaults = asdict(RopeScalingConfig())  # a written-out spec.yaml lists every default
        params = {k: v for k, v in params.items() if k not in defaults or v != defaults[k] or k == "type"}
    try:
        return scaling_from_params(params, max_position_embeddings, strict=True)
    except RopeError as err:
        raise SpecError(f"model.rope_scaling.{err.key}", err.reason) from None


def resolve_rope(raw: dict) -> dict:
    """Type ``raw['model']['rope_scaling']`` into its full field mapping (in place) and default a
    length-dependent type's ``seq_len`` to ``data.max_seq_len``."""
    model = raw.get("model")
    if not isinstance(model, dict) or "rope_scaling" not in model:
        return raw
    scaling = parse_rope_scaling(model["rope_scaling"])
    if scaling.type in LENGTH_TYPES and not scaling.seq_len:
        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        length = data.get("max_seq_len", DataSpec.max_seq_len)
        if isinstance(length, int) and not isinstance(length, bool):
            scaling = RopeScalingConfig(**{**asdict(scaling), "seq_len": length})
    model["rope_scaling"] = asdict(scaling)
    return raw


def check_rope(m):
    """After typing: transformers' range checks of the model's RoPE scaling."""
    try:
        check_scaling(m.rope_scaling, m.head_dim)
    except RopeError as err:
        raise SpecError(f"model.rope_scaling.{err.key}", err.reason) from None
