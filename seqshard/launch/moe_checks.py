"""Spec checks of ``model.moe`` and ``arch: minimax`` (one SpecError line each, before launch)."""
from __future__ import annotations

from .spec import SpecError

SCORES = ("softmax", "sigmoid")


def check_moe(spec, world_size: int | None = None):
    m, p = spec.model, spec.parallel
    e = m.moe
    check_ep(spec, world_size)
    if e.score not in SCORES:
        raise SpecError("model.moe.score", f"router type {e.score!r} is not supported (one of {', '.join(SCORES)})")
    if e.num_experts < 0:
        raise SpecError("model.moe.num_experts", f"must be >= 0, got {e.num_experts}")
    if m.arch == "minimax" and not e.num_experts:
        raise SpecError("model.moe.num_experts", "arch minimax has mixture-of-experts MLPs: set it >= 1")
    if not e.num_experts:
        return
    if not 1 <= e.top_k <= e.num_experts:
        raise SpecError("model.moe.top_k", f"must be in [1, model.moe.num_experts {e.num_experts}], got {e.top_k}")
    for key in ("expert_ffn_dim", "shared_expert_ffn_dim"):
        if getattr(e, key) < 0:
            raise SpecError(f"model.moe.{key}", f"must be >= 0, got {getattr(e, key)}")
    if e.aux_loss_coef < 0:
        raise SpecError("model.moe.aux_loss_coef", f"must be >= 0, got {e.aux_loss_coef}")
    if e.layers and (len(e.layers) != m.n_layers or set(e.layers) - set("ED")):
        raise SpecError("model.moe.layers", f"{e.layers!r} must be {m.n_layers} letters of E (experts) and "
                        "D (dense MLP), one per layer, or empty (every layer E)")
    if m.arch not in ("llama", "minimax"):
        raise SpecError("model.moe.num_experts", f"mixture-of-experts MLPs are built for arch llama and minimax, "
                        f"not {m.arch}")
    if spec.train.mlp_tiles != 1:
        raise SpecError("train.mlp_tiles", f"{spec.train.mlp_tiles}: tiling splits the router's statistics; "
                        "mixture-of-experts MLPs run untiled (set 1)")
    if p.sp_method == "adaptive":
        raise SpecError("parallel.sp_method", "adaptive groups do not carry the MoE load-balancing counts; "
                        "use ulysses, ring, allgather or usp")


def check_ep(spec, world_size: int | None):
    """``parallel.ep``: experts split over groups of ep ranks (parallel/ep.py)."""
    ep, e, engine = spec.parallel.ep, spec.model.moe, spec.train.engine
    if ep < 1:
        raise SpecError("parallel.ep", f"must be >= 1, got {ep}")
    if ep == 1:
        return
    if e.num_experts < 1:
        raise SpecError("parallel.ep", f"{ep} > 1 shards mixture-of-experts MLPs, and this model has none "
                        "(model.moe.num_experts is 0): set parallel.ep 1")
    if e.num_experts % ep:
        raise SpecError("parallel.ep", f"{ep} does not divide model.moe.num_experts {e.num_experts}")
    if world_size is not None and world_size % ep:
        raise SpecError("parallel.ep", f"{ep} does not divide the {world_size} ranks (dp x sp) it is carved from")
    if engine != "torch":
        why = ("fsdp2 would shard the expert tensors over all ranks, not over their replicas"
               if engine == "fsdp2" else "DeepSpeed reduces every gradient over all ranks")
        raise SpecError("parallel.ep", f"{ep} > 1 runs on train.engine torch only ({why}); set train.engine torch "
                        "or parallel.ep 1")
