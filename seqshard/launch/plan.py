"""``seqshard plan SPEC``: the memory model's per-rank breakdown and the longest sequence that fits."""
from __future__ import annotations

import dataclasses

from seqshard.parallel import memory_model as mm

from .spec import apply_overrides, load_raw, load_spec


def plan_lines(spec, world_size: int, device: str, memory_gb: float) -> list[str]:
    c = mm.config_from_spec(spec, world_size, device)
    terms = mm.predict_peak(spec.model, spec.data.max_seq_len, c)
    lines = [f"{spec.name}: {mm.n_params(spec.model):,} parameters; sp {c.sp} ({c.sp_method}), dp {c.dp}, "
             f"ZeRO {c.zero_stage}, checkpointing {c.checkpointing}, offload {c.offload}, mlp_tiles {c.mlp_tiles}, "
             f"{device}",
             f"predicted peak per rank at data.max_seq_len = {spec.data.max_seq_len} tokens:",
             mm.format_breakdown(terms)]
    if memory_gb > 0:
        cap = memory_gb * 2**30
        lines.append(f"longest sequence fitting {memory_gb:g} GiB per rank:")
        for ac in ("none", "selective", "full"):
            for tiles in (1, 0):
                cc = dataclasses.replace(c, checkpointing=ac, mlp_tiles=tiles, offload=c.offload and ac != "none")
                mark = " <- this spec" if (ac, tiles) == (c.checkpointing, c.mlp_tiles) else ""
                lines.append(f"  checkpointing {ac:<9} mlp_tiles {tiles}: "
                             f"{mm.longest_fitting(spec.model, cc, cap):>14,} tokens{mark}")
    return lines


def cmd_plan(args) -> int:
    spec = load_spec(args.spec, args.overrides + ["train.device_memory_gb=0"], args.world_size)
    world = args.world_size or spec.world_size
    raw = apply_overrides(load_raw(args.spec), args.overrides)
    gb = args.memory_gb if args.memory_gb is not None else float(raw.get("train", {}).get("device_memory_gb", 0))
    print("\n".join(plan_lines(spec, world, args.device, gb)))
    return 0


def add_parser(sub, add_spec_args):
    p = sub.add_parser("plan", help="predicted peak memory per rank and the longest sequence that fits",
                       description="The memory model (seqshard/parallel/memory_model.py) for a spec: per-rank "
                       "bytes by term at data.max_seq_len, and the longest sequence that fits --memory-gb.")
    add_spec_args(p)
    p.add_argument("--memory-gb", type=float, help="device memory per rank (default: train.device_memory_gb)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu counts the process runtime and keeps offloaded inputs; cuda frees them")
    p.add_argument("--world-size", type=int, help="ranks (default: launch.nproc_per_node x nnodes)")
