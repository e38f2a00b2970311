"""transformers' ``rope_parameters`` <-> :class:`RopeScalingConfig`, with transformers' checks.

One reading for the three places a RoPE comes from: a checkpoint's ``config.json`` (lenient, like
transformers: ``original_max_position_embeddings`` defaults to ``max_position_embeddings``), and
the overrides of a job spec (``model.rope_scaling``) or of ``from_hf(rope_scaling=...)`` (strict:
what the extension needs must be given). Bad values raise :class:`RopeError` naming the key.
"""
from __future__ import annotations

from dataclasses import fields

from .config import RopeScalingConfig

TYPES = ("none", "linear", "dynamic", "yarn", "llama3", "longrope")
FIELDS = tuple(f.name for f in fields(RopeScalingConfig))
# keys of transformers' rope_parameters that are not a scaling parameter
THETA_KEYS = ("rope_type", "type", "rope_theta")
NEEDS_ORIGINAL = ("yarn", "llama3", "longrope")
REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
            "longrope": ("short_factor", "long_factor")}


class RopeError(ValueError):
    """A RoPE scaling transformers would reject; ``key`` is the parameter, ``reason`` why."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def rope_type(params: dict) -> str:
    kind = params.get("rope_type", params.get("type")) or "none"
    return "none" if kind == "default" else kind


def scaling_from_params(params: dict, max_position_embeddings: int | None = None,
                        strict: bool = True) -> RopeScalingConfig:
    """A :class:`RopeScalingConfig` from transformers-style ``params`` (``rope_type`` or ``type``).

    ``strict`` (overrides): unknown keys and a missing ``original_max_position_embeddings`` are
    errors. Otherwise (config.json) they are read as transformers reads them: unknown keys ignored,
    the original length defaulting to ``max_position_embeddings``. ``dynamic`` always takes its
    original length from ``max_position_embeddings`` when params do not name one.
    """
    kind = rope_type(params)
    if strict and "rope_theta" in params:
        raise RopeError("rope_theta", "is not a scaling parameter: set model.rope_theta (from_hf: rope_theta=)")
    if kind not in TYPES:
        raise RopeError("type", f"{kind!r} is not a RoPE type seqshard models (known: default, "
                        f"{', '.join(TYPES[1:])})")
    if kind == "none":
        extra = sorted(set(params) - {*THETA_KEYS, "seq_len"})
        if strict and extra:
            raise RopeError(extra[0], "is not a parameter of the default RoPE (set type)")
        return RopeScalingConfig()
    known = set(FIELDS) - {"type"}
    unknown = sorted(k for k in params if k not in known and k not in THETA_KEYS)
    if strict and unknown:
        raise RopeError(unknown[0], f"is not a parameter of {kind} RoPE (known: {', '.join(sorted(known))})")
    for key in REQUIRED.get(kind, ()):
        if params.get(key) is None:
            raise RopeError(key, f"{kind} RoPE needs it")
    values = {k: v for k, v in params.items() if k in known and v is not None}
    if "original_max_position_embeddings" not in values and kind != "linear":
        # dynamic divides by the checkpoint's max_position_embeddings (transformers reads no other key)
        if max_position_embeddings and (kind == "dynamic" or not strict):
            values["original_max_position_embeddings"] = int(max_position_embeddings)
        else:
            raise RopeError("original_max_position_embeddings", f"{kind} RoPE needs the length the "
                            "checkpoint was trained at")
    if kind == "longrope" and "factor" not in values and max_position_embeddings:
        # transformers: the ratio of the extended to the original length
        values["factor"] = max_position_embeddings / values["original_max_position_embeddings"]
    typed = {}
    defaults = RopeScalingConfig()
    for key, value in values.items():
        want = type(getattr(defaults, key))
        if want is list:
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
                raise RopeError(key, f"must be a list of numbers, got {value!r}")
            typed[key] = [float(x) for x in value]
        elif want is bool:
            typed[key] = bool(value)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RopeError(key, f"must be a number, got {value!r}")
            if want is int and value != int(value):
                raise RopeError(key, f"must be an integer, got {value!r}")
            typed[key] = want(value)
    return RopeScalingConfig(type=kind, **typed)


def check_scaling(s: RopeScalingConfig, head_dim: int):
    """transformers' range checks (it warns; seqshard refuses): a RoPE that would train silently
    wrong raises :class:`RopeError`."""
    if s.type not in TYPES:
        raise RopeError("type", f"{s.type!r} is not one of {', '.join(TYPES)}")
    if s.type == "none":
        return
    if s.factor < 1:
        raise RopeError("factor", f"must be >= 1 (a factor below 1 shrinks the context), got {s.factor}")
    if s.type in (*NEEDS_ORIGINAL, "dynamic") and s.original_max_position_embeddings < 1:
        raise RopeError("original_max_position_embeddings", f"must be >= 1, got {s.original_max_position_embeddings}")
    if s.attention_factor < 0:
        raise RopeError("attention_factor", f"must be >= 0 (0: derived from factor), got {s.attention_factor}")
    if s.seq_len < 0:
        raise RopeError("seq_len", f"must be >= 0 (0: data.max_seq_len), got {s.seq_len}")
    if s.type == "yarn" and s.beta_fast < s.beta_slow:
        raise RopeError("beta_fast", f"{s.beta_fast} must be >= beta_slow {s.beta_slow}")
    if s.type == "llama3" and s.high_freq_factor <= s.low_freq_factor:
        raise RopeError("high_freq_factor", f"{s.high_freq_factor} must be > low_freq_factor {s.low_freq_factor}")
    if s.type == "longrope":
        for key in ("short_factor", "long_factor"):
            got = len(getattr(s, key))
            if got != head_dim // 2:
                raise RopeError(key, f"has {got} numbers, head_dim {head_dim} needs {head_dim // 2}")


USED = {"linear": ("factor",), "dynamic": ("factor",),
        "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                 "mscale", "mscale_all_dim", "truncate"),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                     "long_factor")}
OPTIONAL_ZERO = ("attention_factor", "mscale", "mscale_all_dim")  # 0 = not set


def to_hf_params(theta: float, s: RopeScalingConfig) -> dict:
    """``rope_parameters`` as transformers 5 reads them (only the keys the type uses)."""
    if s.type == "none":
        return {"rope_type": "default", "rope_theta": theta}
    out = {"rope_type": s.type, "rope_theta": theta}
    for key in USED[s.type]:
        value = getattr(s, key)
        if key in OPTIONAL_ZERO and not value:
            continue
        out[key] = list(value) if isinstance(value, list) else value
    return out


def hf_max_positions(s: RopeScalingConfig, trained_len: int, checkpoint_max: int = 0) -> int:
    """``max_position_embeddings`` of an exported config.json: the extended length. ``dynamic``
    keeps the original (transformers' formula divides by it)."""
    if s.type == "dynamic":
        return s.original_max_position_embeddings
    if s.type in NEEDS_ORIGINAL:
        return max(int(round(s.original_max_position_embeddings * s.factor)), trained_len)
    if s.type == "linear":
        return max(int(round((checkpoint_max or trained_len) * s.factor)), trained_len)
    return max(checkpoint_max, trained_len)
