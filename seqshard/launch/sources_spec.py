"""``data.sources`` / ``data.eval.sources`` and the long-document keys, checked before launch.

Each list entry is typed like any spec section (unknown keys and wrong types name
``data.sources[i].key``); then weights, names, formats and the long-document policy are checked.
The files of every source are checked by launch/datacheck.py with the same key paths.
"""
from __future__ import annotations

import math

from seqshard.data.chat import LOSS_ON, has_chat_template
from seqshard.data.sources import FORMATS, LONG_DOCUMENTS, Source, eval_sources_of, sources_of

from .spec import SpecError, _build

PER_SOURCE_KEYS = ("source", "weight", "name", "format", "loss_on", "loss_weight", "upsample_long")


def _typed(entries, at: str, defaults: dict) -> list[Source]:
    if not isinstance(entries, list):
        raise SpecError(at, f"expected a list of sources, got {type(entries).__name__}")
    out = []
    for i, raw in enumerate(entries):
        path = f"{at}[{i}]"
        if not isinstance(raw, dict):
            raise SpecError(path, f"expected a mapping {{source: PATH, weight: ...}}, got {raw!r}")
        if "source" not in raw:
            raise SpecError(f"{path}.source", f"missing: every entry names its data (its keys: {sorted(raw)})")
        out.append(_build(Source, {**defaults, **raw}, path))
    return out


def _check_one(src: Source, at: str, tokenizer: str) -> None:
    if not (src.weight > 0 and math.isfinite(src.weight)):
        raise SpecError(f"{at}.weight", f"must be > 0, got {src.weight}")
    if src.format not in FORMATS:
        raise SpecError(f"{at}.format", f"{src.format!r} is not one of {', '.join(FORMATS)}")
    if src.loss_on not in LOSS_ON:
        raise SpecError(f"{at}.loss_on", f"{src.loss_on!r} is not one of {', '.join(LOSS_ON)}")
    if src.format == "chat" and not has_chat_template(tokenizer):
        raise SpecError(f"{at}.format", f"chat needs a tokenizer with a chat template; data.tokenizer {tokenizer} "
                        "has none (name a Hugging Face tokenizer folder whose tokenizer_config.json has chat_template)")
    if not (src.loss_weight > 0 and math.isfinite(src.loss_weight)):
        raise SpecError(f"{at}.loss_weight", f"must be a finite number > 0, got {src.loss_weight}")
    up = src.upsample_long
    if up.min_len < 0 or up.factor < 1:
        raise SpecError(f"{at}.upsample_long", f"needs min_len >= 0 and factor >= 1, got {up.min_len}, {up.factor}")


def source_paths(d) -> list[tuple[str, Source]]:
    """(key path, source) of every training and held-out source."""
    train = [(f"data.sources[{i}]" if d.sources else "data", s) for i, s in enumerate(sources_of(d))]
    held = eval_sources_of(d)
    at = "data.eval.sources" if d.eval.sources else "data.eval"
    return train + [(f"{at}[{i}]" if d.eval.sources else at, s) for i, s in enumerate(held)]


def check_sources(spec) -> None:
    d = spec.data
    if d.sources:
        typed = _typed(d.sources, "data.sources", {})
        default = type(d)()
        for key in PER_SOURCE_KEYS:
            if getattr(d, key) != getattr(default, key):
                raise SpecError(f"data.{key}", "set inside each entry of data.sources, not beside the list "
                                "(a value here names no source)")
        names = [s.name or str(i) for i, s in enumerate(typed)]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise SpecError(f"data.sources[{i}].name", f"{name!r} is also the name of data.sources[{names.index(name)}]")
        for i, src in enumerate(typed):
            _check_one(src, f"data.sources[{i}]", d.tokenizer)
    else:
        _check_one(sources_of(d)[0], "data", d.tokenizer)
    mixed = len(sources_of(d)) > 1 or any(s.upsample_long.factor > 1 for s in sources_of(d))
    if d.eval.fraction and mixed:
        raise SpecError("data.eval.fraction", "holds out documents of one plain source; with several "
                        "data.sources or upsample_long use data.eval.sources")
    if d.eval.sources:
        if d.eval.source:
            raise SpecError("data.eval.source", "use data.eval.source or data.eval.sources, not both")
        for i, src in enumerate(_typed(d.eval.sources, "data.eval.sources", {})):
            _check_one(src, f"data.eval.sources[{i}]", d.tokenizer)
            if src.loss_weight != 1.0:
                raise SpecError(f"data.eval.sources[{i}].loss_weight", f"{src.loss_weight}: the held-out loss is "
                                "unweighted (eval_loss, eval_loss_by_source); loss_weight applies to data.sources")
    if d.long_documents not in LONG_DOCUMENTS:
        raise SpecError("data.long_documents", f"{d.long_documents!r} is not one of {', '.join(LONG_DOCUMENTS)}")
    if d.continue_positions and d.long_documents != "split":
        raise SpecError("data.continue_positions", f"only with data.long_documents: split, not {d.long_documents}")
