"""``seqshard eval RUN_DIR --by-position BUCKET | --passkey LENGTHS``: long-context evaluation.

Flags are checked against the run's spec (and, with ``train.device_memory_gb``, the memory model)
before any process group starts; then the checkpoint is loaded into the spec's layout and
``train/long_eval.py`` scores it. Rank 0 writes the JSON and a PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .spec import SpecError

EXAMPLES = """long-context evaluation:
  seqshard eval runs/ctx --by-position 256 --max-len 4096 --out eval/pos.json   # JSON + eval/pos.png
  seqshard eval runs/ctx --passkey 1K,2K,4K --depths 0,0.5,1 --trials 8
  torchrun --nproc-per-node 2 -m seqshard eval runs/ctx --by-position 512 --max-len 8K --set parallel.sp=2 \\
      --set parallel.sp_method=ring"""


def add_long_eval_args(p):
    g = p.add_argument_group("long-context evaluation (on held-out documents; under the spec's SP layout)")
    g.add_argument("--by-position", dest="bucket", type=int, metavar="BUCKET",
                   help="mean loss per BUCKET positions of held-out documents of at least --max-len tokens; "
                   "writes JSON [{start, end, loss, tokens}] and a PNG")
    g.add_argument("--max-len", metavar="L", help="tokens per document scored by position (K = 1024; "
                   "default: the spec's train.eval_long.max_len or data.max_seq_len)")
    g.add_argument("--documents", type=int, metavar="N", help="held-out documents scored by position (default 8)")
    g.add_argument("--passkey", metavar="LENGTHS", help="passkey retrieval at these context lengths, e.g. 512,1K,4K; "
                   "writes JSON [{length, depth, accuracy, key_prob, trials}] and a heatmap PNG")
    g.add_argument("--depths", metavar="D,D,..", help="needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    g.add_argument("--trials", type=int, metavar="N", help="keys per (length, depth) (default 4)")
    g.add_argument("--out", metavar="FILE", help="result JSON (default RUN_DIR/eval/<kind>_step<N>.json); "
                   "the PNG goes beside it, a passkey result beside a by-position one as <stem>_passkey.json")
    g.add_argument("--compare", action="append", default=[], metavar="[LABEL=]FILE",
                   help="an earlier --by-position JSON drawn in the same plot (repeatable)")
    g.add_argument("--label", help="this checkpoint's label in the plot (default: step N)")
    g.add_argument("--mark-len", type=int, metavar="L", help="the 'trained length' line of the plot (default: the "
                   "length the checkpoint's stage trained at)")
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def long_eval_config(spec, args, world_size: int):
    """The EvalLongSpec the flags ask for, validated (SpecError naming the flag); None without them."""
    from .long_eval_checks import CLI_NAMES, check_long_eval, cli_config, parse_depths, parse_sizes

    if args.bucket is None and args.passkey is None:
        extra = [f for f in ("max_len", "documents", "depths", "trials", "out", "label", "mark_len")
                 if getattr(args, f)]
        if extra or args.compare:
            flag = "--" + (extra[0] if extra else "compare").replace("_", "-")
            raise SpecError(flag, "only used with --by-position BUCKET or --passkey LENGTHS")
        return None
    max_len = parse_sizes("--max-len", args.max_len)[0] if args.max_len else None
    lengths = parse_sizes("--passkey", args.passkey) if args.passkey else None
    depths = parse_depths(args.depths) if args.depths else None
    if args.bucket is not None and args.bucket < 1:
        raise SpecError("--by-position", f"the bucket width must be >= 1 token, got {args.bucket}")
    for flag, value in (("--max-len", max_len), ("--documents", args.documents), ("--trials", args.trials)):
        if value is not None and value < 1:
            raise SpecError(flag, f"must be >= 1, got {value}")
    if lengths is not None and not lengths:
        raise SpecError("--passkey", "expected context lengths, e.g. 512,1K,4K")
    cfg = cli_config(spec, args.bucket, max_len, args.documents, lengths, depths, args.trials)
    check_long_eval(spec, world_size, cfg, CLI_NAMES)
    for item in args.compare:
        file = item.split("=", 1)[-1]
        if not Path(file).is_file():
            raise SpecError("--compare", f"{file}: no such file (a JSON written by --by-position)")
    return cfg


def checkpoint_spec(spec, path, overrides) -> tuple:
    """(spec with the RoPE checkpoint ``path`` was trained with, that training length). With
    ``train.stages`` spec.yaml is the last stage's; an earlier stage's checkpoint keeps its own
    ``rope_theta`` / ``rope_scaling`` (the stage spec its ``trainer.json`` records), unless
    ``--set model.rope_*`` asks otherwise."""
    import dataclasses

    from .export import checkpoint_model

    trained, trained_len = checkpoint_model(Path(path), spec.model, spec.data.max_seq_len)
    model = dataclasses.replace(spec.model, rope_theta=trained.rope_theta, rope_scaling=trained.rope_scaling)
    if any(o.split("=", 1)[0].strip().startswith("model.rope") for o in overrides):
        model = spec.model  # the user's RoPE change at evaluation time wins
    return dataclasses.replace(spec, model=model), trained_len


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def _compare_series(items) -> dict:
    series = {}
    for item in items:
        label, _, file = item.rpartition("=")
        series[label or Path(file).stem] = json.loads(Path(file).read_text())
    return series


def run_long_eval(spec, path, cfg, args, trained_len: int | None = None) -> int:
    """Load checkpoint ``path`` into the spec's layout, evaluate ``cfg``, write JSON and PNGs (rank 0)."""
    import torch.distributed as dist

    from seqshard.report.long_eval import by_position_table, passkey_table, plot_by_position, plot_passkey
    from seqshard.train.logs import peak_memory_mb
    from seqshard.train.long_eval import LongEval, LongEvalError
    from seqshard.train.trainer import setup

    run = setup(spec)
    state = run.engine.load(path)
    step = state["step"]
    names = {"max_len": "--max-len", "passkey": "--passkey"}
    start = time.perf_counter()
    try:
        result = LongEval(spec, run.held_out, cfg, names)(run)
    except LongEvalError as err:  # the same data on every rank: every rank stops here
        raise SpecError(err.path, err.reason) from None
    seconds, peak = time.perf_counter() - start, peak_memory_mb(run.device)
    if dist.get_rank() != 0:
        return 0
    run_dir = Path(spec.train.output_dir)
    label = args.label or f"step {step}"
    default = run_dir / "eval" / f"{'by_position' if cfg.bucket else 'passkey'}_step{step}.json"
    out = Path(args.out) if args.out else default
    if "by_position" in result:
        json_path = _write(out, result["by_position"])
        series = {**_compare_series(args.compare), label: result["by_position"]}
        png = plot_by_position(series, json_path.with_suffix(".png"),
                               args.mark_len or trained_len or spec.data.max_seq_len,
                               f"{spec.name}: held-out loss by position ({cfg.documents} documents of "
                               f"{cfg.max_len or spec.data.max_seq_len} tokens)")
        print(by_position_table(series))
        print(f"wrote {json_path} and {png}", flush=True)
    if "passkey" in result:
        json_path = _write(out.with_name(out.stem + "_passkey.json") if cfg.bucket else out, result["passkey"])
        png = plot_passkey(result["passkey"], json_path.with_suffix(".png"), f"{spec.name} step {step}: passkey "
                           "retrieval (teacher-forced)")
        print(passkey_table(result["passkey"]))
        print(f"wrote {json_path} and {png}", flush=True)
    print(f"evaluated step {step} in {seconds:.1f}s (world {dist.get_world_size()}, sp {spec.parallel.sp}), "
          f"peak memory {peak:.0f} MB on rank 0", flush=True)
    return 0

