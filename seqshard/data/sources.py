"""``data.sources``: the documents of a run as a list of weighted sources (DESIGN.md, Data contract).

The single-source form (``data.source``, ``data.text_field``, ... directly under ``data:``) is the
list of one entry built from those keys; ``data.sources: [...]`` lists several. Each entry is a
:class:`Source`; its ``name`` keys ``tokens_by_source`` and ``loss_by_source`` (default: its index in the list). The
launch layer types and validates the entries (launch/sources_spec.py); code here trusts them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("text", "chat", "prompt_completion")
LONG_DOCUMENTS = ("split", "truncate", "drop")


@dataclass(frozen=True)
class UpsampleLong:
    min_len: int = 0  # documents of at least this many tokens ... (0 = off)
    factor: int = 1  # ... appear this many times per pass over their source


@dataclass(frozen=True)
class Source:
    source: str = "stdlib"
    weight: float = 1.0  # sampling weight; shares are weight / sum of weights
    name: str = ""  # key in tokens_by_source / loss_by_source; "" = the index in the list
    split: str = "train"  # the split of a DatasetDict save_to_disk folder
    text_field: str = "text"
    format: str = "text"  # text | chat | prompt_completion (data/chat.py)
    loss_on: str = "assistant"  # chat: assistant | last | all (the tokens that carry loss)
    loss_weight: float = 1.0  # each loss token's weight in the step loss (train/source_loss.py)
    upsample_long: UpsampleLong = field(default_factory=UpsampleLong)


def _entry(raw: dict, index: int, defaults: dict) -> Source:
    up = raw.get("upsample_long") or {}
    up = up if isinstance(up, UpsampleLong) else UpsampleLong(**{k: int(v) for k, v in up.items()})
    merged = {**defaults, **{k: v for k, v in raw.items() if k != "upsample_long"}}
    merged["name"] = str(merged.get("name") or index)
    for key in ("weight", "loss_weight"):  # YAML 1.1 reads 1e-1 as a string; the spec typed it already
        if key in merged:
            merged[key] = float(merged[key])
    return Source(**merged, upsample_long=up)


def sources_of(d) -> list[Source]:
    """The training sources of a ``DataSpec``, in order."""
    if d.sources:
        return [_entry(raw, i, {}) for i, raw in enumerate(d.sources)]
    up = d.upsample_long
    return [Source(d.source, d.weight, d.name or "0", d.split, d.text_field, d.format, d.loss_on, d.loss_weight,
                   UpsampleLong(up.min_len, up.factor))]


def eval_sources_of(d) -> list[Source]:
    """The held-out sources: ``data.eval.sources``, or ``data.eval.source`` (its split
    ``data.eval.split``, default ``data.split``; its field ``data.eval.text_field``, default
    ``data.text_field``), or none."""
    e = d.eval
    if e.sources:
        return [_entry(raw, i, {"split": d.split, "text_field": d.text_field}) for i, raw in enumerate(e.sources)]
    if e.source:
        return [Source(e.source, 1.0, "0", e.split or d.split, e.text_field or d.text_field)]
    return []
