"""Checks of ``train.eval_long`` and of ``seqshard eval --by-position / --passkey`` (one line each).

The same checks serve the spec keys and the command-line flags: ``names`` maps each field to the
key path or flag the user wrote, so the error names what to change. With
``train.device_memory_gb`` set, every evaluated length must fit one rank by the memory model,
evaluated as a forward without gradients (:func:`eval_peak_bytes`).
"""
from __future__ import annotations

import dataclasses
import math

from seqshard.parallel import memory_model as mm

from .spec import SpecError

SPEC_NAMES = {"every": "train.eval_long.every", "bucket": "train.eval_long.bucket",
              "max_len": "train.eval_long.max_len", "documents": "train.eval_long.documents",
              "lengths": "train.eval_long.passkey.lengths", "depths": "train.eval_long.passkey.depths",
              "trials": "train.eval_long.passkey.trials"}
CLI_NAMES = {"every": "train.eval_long.every", "bucket": "--by-position", "max_len": "--max-len",
             "documents": "--documents", "lengths": "--passkey", "depths": "--depths", "trials": "--trials"}


def eval_peak_bytes(spec, seq_len: int, world_size: int) -> float:
    """Predicted per-rank peak of an evaluation forward of one ``seq_len`` row: the weights (sharded
    as the engine shards them), the runtime, and the larger of one block's forward working set
    (the training model's backward phase bounds it) and the loss phase without weight gradients."""
    m, c = spec.model, mm.config_from_spec(spec, world_size)
    n = math.ceil(seq_len / c.sp)
    act = mm.activation_bytes(m, n, c)
    params = mm.n_params(m) * c.param_bytes / (c.dp if c.zero_stage >= 3 else 1)
    block = act["backward_working_set"] + act["attention_workspace"] + act["comm_buffers"] + act["cpu_sp_rss"]
    loss = n * m.dim * (c.act_bytes + 4) + min(mm.LOSS_CHUNK_BYTES, n * m.vocab_size * 4)
    return params + mm.RUNTIME_BYTES.get(c.device, 0) + max(block, loss)


def _longest_fitting(spec, world_size: int, cap: float) -> int:
    lo, hi = 0, 1 << 30
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if eval_peak_bytes(spec, mid, world_size) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _check_fits(spec, world_size, name, length):
    gb = spec.train.device_memory_gb
    if not gb:
        return
    need = eval_peak_bytes(spec, length, world_size)
    if need > gb * 2**30:
        fit = _longest_fitting(spec, world_size, gb * 2**30)
        raise SpecError(name, f"{length} tokens need {need / 2**30:.2f} GiB per rank for evaluation by the "
                        f"memory model (train.device_memory_gb={gb:g}, sp {spec.parallel.sp}); at most {fit} "
                        "fit: shorten it or raise parallel.sp")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_long_eval(spec, world_size: int, cfg=None, names=None):
    """Validate ``cfg`` (default: ``spec.train.eval_long``) against the spec; SpecError naming ``names``."""
    from seqshard.data.hf_tokenizer import load_tokenizer
    from seqshard.train.long_eval import passkey_overhead

    cfg, names = cfg or spec.train.eval_long, names or SPEC_NAMES
    p = cfg.passkey
    if cfg.every < 0:
        raise SpecError(names["every"], f"must be >= 0, got {cfg.every}")
    if cfg.bucket < 0:
        raise SpecError(names["bucket"], f"must be >= 1 (bucket width in tokens), got {cfg.bucket}")
    if cfg.every and not (cfg.bucket or p.lengths):
        raise SpecError(names["every"], "nothing to evaluate: set train.eval_long.bucket or passkey.lengths")
    if (cfg.bucket or p.lengths) and not (spec.data.eval.fraction or spec.data.eval.source):
        raise SpecError(names["bucket"] if cfg.bucket else names["lengths"], "needs held-out data: set "
                        "data.eval.fraction (e.g. 0.05) or data.eval.source")
    if cfg.max_len and cfg.max_len < 2:
        raise SpecError(names["max_len"], f"must be >= 2 tokens, got {cfg.max_len}")
    max_len = cfg.max_len or spec.data.max_seq_len
    if cfg.bucket:
        if cfg.bucket > max_len - 1:
            raise SpecError(names["bucket"], f"{cfg.bucket} is wider than the {max_len - 1} scored positions of "
                            f"a {max_len}-token document (max_len {max_len}); use a bucket below it")
        if cfg.documents < 1:
            raise SpecError(names["documents"], f"must be >= 1, got {cfg.documents}")
        _check_fits(spec, world_size, names["max_len"], max_len)
    if not isinstance(p.lengths, list) or not all(_is_int(x) for x in p.lengths):
        raise SpecError(names["lengths"], f"expected a list of token counts, got {p.lengths!r}")
    if not isinstance(p.depths, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 and 0 <= x <= 1 for x in p.depths) or not p.depths:
        raise SpecError(names["depths"], f"expected a non-empty list of depths in [0, 1], got {p.depths!r}")
    if not p.lengths:
        return
    if p.trials < 1:
        raise SpecError(names["trials"], f"must be >= 1, got {p.trials}")
    overhead = passkey_overhead(load_tokenizer(spec.data.tokenizer))
    for length in p.lengths:
        if length <= overhead:
            raise SpecError(names["lengths"], f"{length} tokens leave no haystack: the needle, question and "
                            f"key take {overhead}; use at least {overhead + 1}")
    _check_fits(spec, world_size, names["lengths"], max(p.lengths))


def cli_config(spec, bucket, max_len, documents, lengths, depths, trials):
    """The EvalLongSpec of ``seqshard eval`` flags (unset flags keep the spec's train.eval_long)."""
    base = spec.train.eval_long
    passkey = dataclasses.replace(base.passkey, **{k: v for k, v in (("lengths", lengths), ("depths", depths),
                                                                     ("trials", trials)) if v is not None})
    if lengths is None and bucket is not None:
        passkey = dataclasses.replace(passkey, lengths=[])  # --by-position alone: no passkey
    changes = {k: v for k, v in (("bucket", bucket), ("max_len", max_len), ("documents", documents)) if v is not None}
    if bucket is None and lengths is not None:
        changes["bucket"] = 0  # --passkey alone: no loss by position
    return dataclasses.replace(base, passkey=passkey, every=0, **changes)


def parse_sizes(flag: str, text: str) -> list[int]:
    """``512,1K,4096`` -> [512, 1024, 4096] (K = 1024); SpecError naming ``flag`` otherwise."""
    out = []
    for part in text.split(","):
        part = part.strip()
        scale = 1024 if part[-1:].upper() == "K" else 1
        try:
            out.append(int(part[:-1] if scale > 1 else part) * scale)
        except ValueError:
            raise SpecError(flag, f"{part!r} is not a token count (e.g. 512, 4K)") from None
    return out


def parse_depths(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise SpecError("--depths", f"{text!r} is not a comma-separated list of numbers in [0, 1]") from None
