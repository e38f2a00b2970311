"""``model: {hf: PATH}`` in a job spec: the model keys come from the folder's config.json.

An explicit key that agrees with the checkpoint is fine, one that conflicts is a SpecError naming
it (a checkpoint's shape cannot be changed by the spec). ``model.rope_theta`` and
``model.rope_scaling`` are the exception: they override config.json's RoPE (context extension;
rope_spec.py reads them), and the resolved spec (``spec.yaml``) records the RoPE the run uses.
Runs before typing and validation. Without ``data.tokenizer``, the run uses the checkpoint
folder's tokenizer when the folder has one.
"""
from __future__ import annotations

from dataclasses import replace

from .spec import SpecError

IMPLS = ("native", "transformers")
OWN_KEYS = ("hf", "impl", "hf_arch")  # keys of model: that are not the checkpoint's to decide
ROPE_OVERRIDES = ("rope_theta", "rope_scaling")  # native import: the spec's value replaces config.json's
MOE_OVERRIDES = ("aux_loss_coef",)  # model.moe keys the spec may set over config.json's (0 turns the loss off)


def _transformers_fields(path) -> dict:
    """Generic wrap: only the sizes the rest of seqshard reads (vocabulary, heads for SP)."""
    from seqshard.models.hf import read_config

    hf = read_config(path)
    n_heads = int(hf.get("num_attention_heads", 1))
    dim = int(hf.get("hidden_size", 128))
    head_dim = int(hf.get("head_dim") or dim // n_heads)
    return dict(dim=dim, n_layers=int(hf.get("num_hidden_layers", 1)),
                n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                ffn_dim=int(hf.get("intermediate_size") or 4 * dim), vocab_size=int(hf["vocab_size"]),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attn_head_dim=0 if head_dim * n_heads == dim else head_dim, hf=str(path),
                hf_arch=(hf.get("architectures") or [""])[0])


def resolve_hf_model(raw: dict) -> dict:
    """Fill ``raw['model']`` from ``model.hf``'s config.json (in place); a no-op without ``hf``."""
    from .rope_spec import parse_rope_scaling, resolve_rope

    model = raw.get("model")
    if not isinstance(model, dict) or not model.get("hf"):
        return resolve_rope(raw)
    from seqshard.models.hf import HFError, model_config_fields

    path, impl = model["hf"], model.get("impl", "native")
    if impl not in IMPLS:
        raise SpecError("model.impl", f"{impl!r} is not one of {', '.join(IMPLS)}")
    try:
        derived = model_config_fields(path) if impl == "native" else _transformers_fields(path)
    except HFError as err:
        raise SpecError("model.hf", str(err)) from None
    except (KeyError, ValueError, TypeError) as err:
        raise SpecError("model.hf", f"{path}/config.json: cannot read {err}") from None
    overrides = ROPE_OVERRIDES if impl == "native" else ()
    if impl == "native" and isinstance(model.get("moe"), dict) and "moe" in derived:  # a training choice
        derived["moe"] = replace(derived["moe"], **{k: v for k, v in model["moe"].items() if k in MOE_OVERRIDES})
    for key, value in model.items():
        if key in OWN_KEYS or key in overrides or key not in derived:
            continue
        want = derived[key]
        want = want.__dict__ if hasattr(want, "__dataclass_fields__") else want
        if isinstance(value, dict) and isinstance(want, dict):  # a nested section: the keys given
            for sub, v in value.items():
                if sub in want and v != want[sub]:
                    raise SpecError(f"model.{key}.{sub}", f"{v!r} conflicts with {path}/config.json "
                                    f"({want[sub]!r}); drop the key, the checkpoint decides it")
            continue
        if value != want:
            raise SpecError(f"model.{key}", f"{value!r} conflicts with {path}/config.json ({want!r}); "
                            "drop the key, the checkpoint decides it")
    scaling = derived.pop("rope_scaling", None)
    merged = {**derived, **{k: v for k, v in model.items() if k not in derived or k in overrides}, "impl": impl}
    if scaling is not None and "rope_scaling" not in model:
        merged["rope_scaling"] = dict(scaling.__dict__)
    elif "rope_scaling" in model and impl == "native":  # dynamic / longrope defaults need the checkpoint's length
        from seqshard.models.hf import read_config

        max_pos = read_config(path).get("max_position_embeddings")
        merged["rope_scaling"] = dict(parse_rope_scaling(model["rope_scaling"], max_pos).__dict__)
    for key in ("moe", "minimax"):  # MoE families: nested sections as mappings, like the spec's own
        if hasattr(merged.get(key), "__dataclass_fields__"):
            merged[key] = dict(merged[key].__dict__)
    raw["model"] = merged
    _default_tokenizer(raw, path)
    return resolve_rope(raw)


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def checkpoint_tokenizer(path) -> bool:
    """Whether the checkpoint folder holds a tokenizer (``data.tokenizer`` can name it)."""
    from pathlib import Path

    return any((Path(path) / name).is_file() for name in TOKENIZER_MARKERS)


def _default_tokenizer(raw: dict, path) -> None:
    """``data.tokenizer`` left out: the checkpoint folder's own tokenizer when it has one (the
    resolved spec.yaml then records it, the run logs it, and export copies it); ``byte`` stays
    available by naming it."""
    data = raw.setdefault("data", {})
    if isinstance(data, dict) and "tokenizer" not in data and checkpoint_tokenizer(path):
        data["tokenizer"] = str(path)
