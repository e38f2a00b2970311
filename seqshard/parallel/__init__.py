"""Sequence parallelism: ShardPlan, the SP attention methods, packing, dataset decomposition, the
adaptive planner and ``parallelize`` (DESIGN.md, public contracts).

Names load lazily (PEP 562): the pure planning functions (``pack``, ``decompose``, ``plan_step``)
import no torch.distributed or model code. ``decompose`` and ``parallelize`` are the exceptions:
each shares its name with its module, and Python binds a submodule to its package's attribute
when it is first imported (``seqshard.data.builders`` imports ``seqshard.parallel.decompose``), so
those two modules are imported here once and the attributes set to the functions after them.
"""
from __future__ import annotations

import importlib

from . import decompose as _decompose_module
from . import parallelize as _parallelize_module

decompose = _decompose_module.decompose
parallelize = _parallelize_module.parallelize

_EXPORTS = {
    # planning (pure)
    "ShardPlan": "plan",
    "pack": "packing",
    "plan_step": "planner",
    "static_plan": "planner",
    "CostModel": "cost_model",
    # SP attention, each (q, k, v, plan, group(s), ...) on local shards
    "ulysses_attention": "ulysses",
    "ring_attention": "ring",
    "allgather_attention": "allgather",
    "usp_attention": "usp",
    "lasp1_attention": "lasp1",
    "lasp2_attention": "lasp2",
    # applying it to a model (``parallelize`` and ``decompose`` are bound above)
    "SPContext": "parallelize",
}

__all__ = sorted([*_EXPORTS, "decompose", "parallelize"])


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
