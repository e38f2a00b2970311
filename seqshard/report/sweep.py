"""``seqshard sweep``: run a spec over the cartesian product of world sizes and ``--set`` values.

Every combination is validated before anything starts (one line per invalid one), then run one
after another through the spec's launcher (``launch_command``) with ``launch.nproc_per_node``
set to the world size, each into ``<out>/<combo>/``. Each run folder is self-describing:
``spec.yaml`` (the resolved spec) and ``run.json`` (``world_size``, ``combo``, ``overrides``,
``command``, and after the run ``returncode`` and ``wall_s``, merged with the fields the trainer
writes there), next to the trainer's ``metrics.jsonl`` and ``checkpoints/``.

A ``--set`` value may be ``world`` or ``<int>*world``: it becomes each combination's world size
(times the integer). ``--set parallel.sp=world`` puts all devices on the sequence dimension;
``--set data.tokens_per_step=1024*world`` keeps the tokens per device constant (weak scaling).
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from seqshard.launch.launchers import launch_command
from seqshard.train.logs import read_metrics
from seqshard.launch.spec import Spec, SpecError, load_spec


@dataclass
class Combo:
    """One point of the sweep: a world size and the ``--set`` overrides that vary."""
    world: int
    values: list[tuple[str, str]]  # (key.path, value text), in --set order
    name: str = ""
    spec: Spec | None = None
    error: str = ""
    overrides: list[str] = field(default_factory=list)


def parse_worlds(text: str) -> list[int]:
    try:
        worlds = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise SpecError("--world", f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None
    if not worlds or min(worlds) < 1:
        raise SpecError("--world", f"{text!r} must list world sizes >= 1, e.g. 1,2,4")
    return worlds


def parse_axes(sets: list[str]) -> list[tuple[str, list[str]]]:
    """``key.path=v1,v2`` -> ``(key.path, [v1, v2])``; a value without a comma is a 1-point axis."""
    axes = []
    for item in sets or []:
        if "=" not in item:
            raise SpecError("--set", f"'{item}' is not key.path=value[,value...]")
        key, text = item.split("=", 1)
        values = [v.strip() for v in text.split(",")]
        if not key.strip() or any(not v for v in values):
            raise SpecError("--set", f"'{item}' has an empty key or value")
        axes.append((key.strip(), values))
    return axes


def resolve(value: str, world: int) -> str:
    """``world`` -> the world size, ``<int>*world`` -> that multiple of it, anything else as is."""
    head, star, tail = value.partition("*")
    if value == "world":
        return str(world)
    if star and tail == "world" and head.isdigit():
        return str(int(head) * world)
    return value


def combo_name(world: int, values, axes) -> str:
    """``w2_sp_method=ulysses``: the world and every *varying* axis (last key component)."""
    varying = {k for k, vs in axes if len(vs) > 1}
    parts = [f"w{world}"] + [f"{k.split('.')[-1]}={v}" for k, v in values if k in varying]
    return "_".join(p.replace("/", "-") for p in parts)


def plan(spec_path, worlds: list[int], axes, base_overrides=(), out: Path | None = None) -> list[Combo]:
    """Every combination, each with its validated spec or its one-line ``error``."""
    out = Path(out) if out else None
    combos = []
    for world in worlds:
        for picked in itertools.product(*[vs for _, vs in axes]):
            values = [(k, resolve(v, world)) for (k, _), v in zip(axes, picked)]
            c = Combo(world, values, combo_name(world, values, axes))
            if any(c.name == seen.name for seen in combos):
                continue  # e.g. 2048 and 512*world coincide at world 4
            run_dir = (out or Path("runs/sweep")) / c.name
            c.overrides = [*base_overrides, *[f"{k}={v}" for k, v in values], f"launch.nproc_per_node={world}",
                           "launch.nnodes=1", f"train.output_dir={run_dir}"]
            try:
                c.spec = load_spec(spec_path, c.overrides)
                if c.spec.launch.launcher == "slurm":
                    raise SpecError("launch.launcher", "sweep runs locally, one run after another: "
                                    "use torchrun, deepspeed or mpirun (--set launch.launcher=torchrun)")
            except SpecError as err:
                c.spec, c.error = None, str(err)
            combos.append(c)
    return combos


def default_out(spec_path) -> Path:
    return Path("runs") / f"sweep-{Path(spec_path).stem}"


def _write_run_json(run_dir: Path, fields: dict):
    """Merge ``fields`` into ``run_dir/run.json`` (the trainer may add its own fields)."""
    path = run_dir / "run.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(fields)
    path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def run_one(c: Combo, spec_path) -> dict:
    """Launch one combination and wait for it; returns ``run.json``'s content."""
    run_dir = Path(c.spec.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "run.json"):  # a rerun into the same folder starts clean
        (run_dir / stale).unlink(missing_ok=True)
    cmd = launch_command(c.spec, str(spec_path), c.overrides)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(c.spec.to_dict(), sort_keys=False))
    sweep_fields = {"world_size": c.world, "combo": c.name, "overrides": c.overrides, "command": cmd}
    _write_run_json(run_dir, sweep_fields)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    with open(run_dir / "launch.log", "w") as logf:
        rc = subprocess.call(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    _write_run_json(run_dir, {**sweep_fields, "returncode": rc, "wall_s": round(wall, 3)})
    return json.loads((run_dir / "run.json").read_text())


def progress_line(i: int, n: int, c: Combo, info: dict) -> str:
    run_dir = Path(c.spec.train.output_dir)
    head = f"[{i}/{n}] {c.name}: "
    if info["returncode"] != 0:
        return head + f"FAILED (exit {info['returncode']}) after {info['wall_s']:.1f}s, see {run_dir / 'launch.log'}"
    m = read_metrics(run_dir)
    if not m:
        return head + f"FAILED: no metrics.jsonl after {info['wall_s']:.1f}s, see {run_dir / 'launch.log'}"
    steps = m[1:] if len(m) > 1 else m
    tps = sum(s["tokens"] for s in steps) / sum(s["step_time_s"] for s in steps)
    return head + (f"ok in {info['wall_s']:.1f}s, {len(m)} steps, loss {m[0]['loss']:.3f} -> {m[-1]['loss']:.3f}, "
                   f"{tps:.0f} tokens/s")


def describe(c: Combo, spec_path) -> str:
    """A dry-run line: the combination and the exact command it would run."""
    s = c.spec
    return (f"{c.name}: world {c.world} = dp {s.dp(c.world)} x sp {s.parallel.sp} ({s.parallel.sp_method}) -> "
            f"{s.train.output_dir}\n    {shlex.join(launch_command(s, str(spec_path), c.overrides))}")


def sweep(spec_path, worlds, axes, out, *, base_overrides=(), dry_run=False, skip_invalid=False,
          log=print) -> int:
    """Plan, report invalid combinations, then run the valid ones in order. Exit code: 0 all ran,
    1 some run failed, 2 invalid combinations without ``skip_invalid`` (nothing started)."""
    combos = plan(spec_path, worlds, axes, base_overrides, out)
    invalid = [c for c in combos if c.error]
    for c in invalid:
        log(f"invalid: {c.name}: {c.error}")
    valid = [c for c in combos if not c.error]
    if invalid and not skip_invalid:
        log(f"seqshard: error: {len(invalid)} of {len(combos)} combinations are invalid; fix them, "
            "narrow --world/--set, or pass --skip-invalid")
        return 2
    if not valid:
        log("seqshard: error: no valid combination to run")
        return 2
    if dry_run:
        for c in valid:
            log(describe(c, spec_path))
        log(f"{len(valid)} runs, {len(invalid)} invalid skipped (dry run: nothing started)")
        return 0
    failed = 0
    for i, c in enumerate(valid, 1):
        info = run_one(c, spec_path)
        line = progress_line(i, len(valid), c, info)
        failed += "FAILED" in line
        log(line)
    log(f"{len(valid) - failed} of {len(valid)} runs finished into {out}; "
        f"next: seqshard report {out} --out {out}/report")
    return 1 if failed else 0
