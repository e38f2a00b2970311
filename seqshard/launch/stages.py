"""``train.stages``: a run in stages, each the base spec with a few keys changed.

```yaml
train:
  stages:
    - {steps: 200, set: {data.max_seq_len: 512, data.tokens_per_step: 8192}}
    - {steps: 100, set: {data.max_seq_len: 4096, model.rope_theta: 160000.0, parallel.sp: 2,
                         parallel.sp_method: ulysses, train.lr: 1.0e-4}}
```

Stage ``i`` runs global steps ``sum(steps[:i]) + 1 .. sum(steps[:i+1])``; ``train.steps`` is the sum
(an explicit different value is an error). Stage ``i``'s spec is the base spec with its ``set``
applied (``--set``'s dotted keys), typed and validated like any spec, for every stage before
anything starts; an error names ``train.stages[i].set.<key>``. Only what may change between
stages of one run is allowed (:data:`STAGE_KEYS`); the model's shape, the data and the tokenizer
are fixed. The learning rate stays one schedule over the global step and ``train.steps``; a stage
that sets ``train.lr`` (or the schedule keys) evaluates its own settings at the same global step.
A ``dynamic`` / ``longrope`` RoPE whose ``seq_len`` followed ``data.max_seq_len`` follows the
stage's length. The trainer runs them (train/stages.py).
"""
from __future__ import annotations

import copy

from .spec import SpecError, _set_path

# keys a stage may set; a key ending in "." allows everything under it
STAGE_KEYS = (
    "data.max_seq_len", "data.tokens_per_step", "data.micro_batch_tokens", "data.batching",
    "data.pack_method", "data.min_seq_len", "data.curriculum.",
    "model.rope_theta", "model.rope_scaling",
    "parallel.",
    "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.lr_schedule", "train.decay_fraction",
    "train.grad_clip", "train.checkpoint_every", "train.async_checkpoint", "train.activation_checkpointing",
    "train.offload_activations", "train.mlp_tiles", "train.reshard_after_forward", "train.offload_params",
    "train.device_memory_gb", "train.log_every", "train.eval_every", "train.eval_tokens",
)
FIXED = {  # prefix -> why it cannot change between stages
    "model.": "the model's shape and weights are one for the whole run (stages may change model.rope_theta "
              "and model.rope_scaling)",
    "data.tokenizer": "the tokenizer (and with it the vocabulary) is fixed for the run",
    "data.": "the training data is fixed for the run (stages may change lengths and batch sizes)",
    "seed": "the seed is fixed for the run",
    "train.steps": "a stage's length is its own steps",
    "train.stages": "stages do not nest",
    "train.": "fixed for the run (optimizer, engine, output_dir)",
    "launch.": "the launch (world size, hosts) is fixed for the run",
}


def _allowed(key: str) -> bool:
    return any(key == k or key.startswith(k.rstrip(".") + ".") for k in STAGE_KEYS)


def _why_fixed(key: str) -> str:
    for prefix, why in FIXED.items():
        if key == prefix.rstrip(".") or key.startswith(prefix):
            return why
    return f"not a spec key a stage can set (allowed: {', '.join(STAGE_KEYS)})"


def prepare_stages(raw: dict) -> dict:
    """Before typing: check the shape of ``train.stages`` and set ``train.steps`` to their sum."""
    train = raw.get("train")
    if not isinstance(train, dict) or not train.get("stages"):
        return raw
    stages = train["stages"]
    if not isinstance(stages, list):
        raise SpecError("train.stages", f"expected a list of {{steps, set}}, got {type(stages).__name__}")
    for i, stage in enumerate(stages):
        path = f"train.stages[{i}]"
        if not isinstance(stage, dict):
            raise SpecError(path, f"expected a mapping {{steps, set}}, got {stage!r}")
        extra = sorted(set(stage) - {"steps", "set"})
        if extra:
            raise SpecError(f"{path}.{extra[0]}", "unknown key (known: steps, set)")
        steps = stage.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SpecError(f"{path}.steps", f"must be an integer >= 1 (stages run one after another), got {steps!r}")
        changes = stage.get("set", {})
        if not isinstance(changes, dict):
            raise SpecError(f"{path}.set", f"expected a mapping of key.path: value, got {changes!r}")
        for key in changes:
            if not _allowed(str(key)):
                raise SpecError(f"{path}.set.{key}", f"cannot change between stages: {_why_fixed(str(key))}")
    total = sum(s["steps"] for s in stages)
    if "steps" in train and train["steps"] != total:
        raise SpecError("train.steps", f"{train['steps']!r} but train.stages run {total} steps in all; "
                        "drop train.steps or make it their sum")
    train["steps"] = total
    return raw


def _stage_raw(base: dict, changes: dict) -> dict:
    raw = copy.deepcopy(base)
    raw["train"]["stages"] = []
    scaling = raw.get("model", {}).get("rope_scaling") or {}
    follows = scaling.get("seq_len") and scaling.get("seq_len") == raw.get("data", {}).get("max_seq_len")
    for key, value in changes.items():
        _set_path(raw, key, value)
    rope_set = any(k == "model.rope_scaling" or k.startswith("model.rope_scaling.") for k in changes)
    if follows and "data.max_seq_len" in changes and not rope_set:
        raw["model"]["rope_scaling"]["seq_len"] = 0  # rope_spec.py: 0 = data.max_seq_len
    return raw


def stage_specs(spec, world_size: int | None = None) -> list:
    """One validated Spec per stage of ``spec.train.stages`` (``[]`` without stages)."""
    from .spec import from_dict

    if not spec.train.stages:
        return []
    base = spec.to_dict()
    out = []
    for i, stage in enumerate(spec.train.stages):
        changes = stage.get("set", {})
        try:
            out.append(from_dict(_stage_raw(base, changes), world_size or spec.world_size))
        except SpecError as err:
            mine = any(err.path == k or err.path.startswith(k + ".") for k in changes)
            if mine:
                raise SpecError(f"train.stages[{i}].set.{err.path}", err.reason) from None
            raise SpecError(f"train.stages[{i}]", f"with its set, {err}") from None
    return out

