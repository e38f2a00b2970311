"""``seqshard`` command line. A bad spec exits 2 with one line naming the key path."""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys

from seqshard.dist.cause import publish
from seqshard.dist.comm_stats import CollectiveError
from seqshard.dist.guard import RankFailure

from .spec import SpecError, load_spec

EPILOG = """examples:
  seqshard validate examples/tiny.yaml
  seqshard launch examples/tiny.yaml --dry-run        # print the torchrun/deepspeed/mpirun command
  seqshard launch examples/tiny.yaml                  # run it (launch.nproc_per_node ranks)
  torchrun --nproc-per-node 2 -m seqshard train examples/tiny.yaml --set train.steps=20
  mpirun -np 2 python -m seqshard train examples/tiny.yaml
"""


def _add_spec_args(p):
    p.add_argument("spec", help="YAML job spec (see examples/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override any spec key, value parsed as YAML (repeatable), e.g. --set parallel.sp=2")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="seqshard", description="Distributed long-context training: "
                                 "sequence parallelism (Ulysses, Ring, USP, LASP-2), packing, adaptive scattering.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher passes --local_rank=N before the subcommand (it also exports LOCAL_RANK)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train under the current launcher (torchrun, deepspeed, mpirun, srun) "
                       "or as one process", description="Train a spec in this process. Under torchrun / "
                       "deepspeed / mpirun / srun every rank runs this; alone it is a 1-rank run.")
    _add_spec_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint "
                   "in train.output_dir/checkpoints")
    p.add_argument("--stop-after", type=int, metavar="N", help="checkpoint and exit after step N "
                   "(the schedule still follows train.steps; resume later with --resume)")
    p.add_argument("--overwrite", action="store_true", help="start over in a train.output_dir that holds a "
                   "run: deletes its checkpoints and metrics (without it, such a folder is refused)")
    p.epilog = ("exit codes: 0 done; 1 a failure (one line names the rank, step and operation); 2 bad input "
                "(spec, run folder, checkpoint that does not fit); 4 a non-finite loss or gradient "
                "(train.on_nonfinite); 75 preempted by SIGTERM / SIGINT / SIGUSR1 after checkpointing the "
                "current step (continue with --resume)")
    p = sub.add_parser("validate", help="check a spec and exit (0 valid, 2 invalid)",
                       description="Type-check and validate a spec against the world size of its launch section.")
    _add_spec_args(p)
    p.add_argument("--world-size", type=int, help="validate for this many ranks instead of launch.nproc_per_node x nnodes")
    p = sub.add_parser("launch", help="build the launcher command from the spec's launch: section and run it",
                       description="Build the torchrun / deepspeed / mpirun command (or SLURM sbatch script) "
                       "from launch:, then run it. --dry-run prints it and starts nothing.")
    _add_spec_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the command (or sbatch script) only")
    p.add_argument("--resume", action="store_true", help="pass --resume to every rank")
    p.add_argument("--overwrite", action="store_true", help="pass --overwrite to every rank")
    p = sub.add_parser("eval", help="held-out loss and perplexity of a run's checkpoint",
                       description="Evaluate a checkpoint of RUN_DIR on its spec's data.eval split, under the "
                       "spec's layout (run it under torchrun / mpirun like train, or as one process).")
    p.add_argument("run_dir", help="a train.output_dir holding spec.yaml and checkpoints/")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the run's spec.yaml, e.g. --set data.eval.source=held_out/")
    from .eval_cli import add_long_eval_args

    add_long_eval_args(p)
    p = sub.add_parser("calibrate", help="fit the cost model's hardware profile on this machine",
                       description="Measure matmul FLOP/s and 2-process all-to-all bandwidth/latency here "
                       "and print (or save) a hardware profile for the adaptive planner and simulate.")
    p.add_argument("--out", help="write the profile as JSON to this path")
    p.add_argument("--spec", help="measure the cost of one micro-batch per group size and method (1: local, "
                   "2: ulysses and ring) by timing this spec's model on 2 processes, documents of 32-2048 "
                   "tokens, then scale it and fit the per-step cost from short 2-rank training runs of the spec "
                   "itself (dp 2, ulysses 2, ring 2, adaptive; 3 runs each, medians; about 4 minutes for a small "
                   "model); --out FILE.json then serves as parallel.planner.profile")
    p = sub.add_parser("spec", help="print the job spec reference (every key, type, default, allowed values)",
                       description="Print the reference of every spec key as Markdown (docs/spec.md is this "
                       "output), or write it to --out.")
    p.add_argument("--reference", action="store_true", help="the whole reference as Markdown (the default)")
    p.add_argument("--out", help="write it to this file (e.g. docs/spec.md) instead of printing it")
    p = sub.add_parser("summary", help="one-paragraph summary of a run folder's metrics.jsonl",
                       description="Print first/last loss, throughput and memory of a finished run.")
    p.add_argument("run_dir", help="a train.output_dir holding metrics.jsonl")
    from seqshard.report.cli import register

    from .export import register as register_export
    from .plan import add_parser as add_plan, cmd_plan

    add_plan(sub, _add_spec_args)
    # sweep, report, simulate; export; plan
    ap.set_defaults(_reports={**register(sub), **register_export(sub), "plan": cmd_plan})
    return ap


def _world_size_from_env() -> int:
    from seqshard.dist.bootstrap import detect_env

    return detect_env().world_size


def cmd_validate(args) -> int:
    spec = load_spec(args.spec, args.overrides, args.world_size)
    ws = args.world_size or spec.world_size
    print(f"{args.spec}: valid ({spec.name}: world {ws} = dp {spec.dp(ws)} x sp {spec.parallel.sp}, "
          f"{spec.parallel.sp_method}, {spec.train.steps} steps)")
    return 0


def cmd_train(args) -> int:
    spec = load_spec(args.spec, args.overrides, _world_size_from_env())
    from seqshard.dist.checkpoint import CheckpointMismatch
    from seqshard.train.trainer import train

    from seqshard.train.guards import NonFiniteError, Preempted
    from seqshard.train.long_eval import LongEvalError

    if args.resume and args.overwrite:
        raise SpecError("--overwrite", "and --resume contradict each other: continue the run or start over")
    try:
        train(spec, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)
    except (CheckpointMismatch, NonFiniteError, Preempted, LongEvalError) as err:  # raised alike on every rank
        if _rank() == 0:
            label = "seqshard:" if isinstance(err, Preempted) else "seqshard: error:"
            print(f"{label} {err}", file=sys.stderr, flush=True)
        return err.exit_code
    return 0


def cmd_launch(args) -> int:
    spec = load_spec(args.spec, args.overrides)
    from .launchers import launch_command

    extra = (["--resume"] if args.resume else []) + (["--overwrite"] if args.overwrite else [])
    cmd = launch_command(spec, args.spec, args.overrides, extra)
    if isinstance(cmd, str):  # slurm: an sbatch script
        if args.dry_run:
            print(cmd, end="")
            return 0
        path = os.path.join(spec.train.output_dir, "job.sbatch")
        os.makedirs(spec.train.output_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(cmd)
        return subprocess.call(["sbatch", path])
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(cmd, env=env)
    # a scheduler's SIGTERM / SIGUSR1 reaches the launcher, which passes it to every rank (they
    # checkpoint and exit 75); Ctrl-C's SIGINT reaches the whole terminal group by itself
    for name in ("SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), lambda signum, frame: proc.send_signal(signum))
    return proc.wait()


def cmd_eval(args) -> int:
    from seqshard.train.evaluate import checkpoint_dir, evaluate_checkpoint

    run_dir = os.path.abspath(args.run_dir)
    spec = load_spec(os.path.join(run_dir, "spec.yaml"), args.overrides + [f"train.output_dir={run_dir}"],
                     _world_size_from_env())
    if not (spec.data.eval.fraction or spec.data.eval.source or spec.data.eval.sources):
        raise SpecError("data.eval", f"{run_dir}/spec.yaml has no held-out data; add --set "
                        "data.eval.source=PATH (or data.eval.fraction, if the run trained with that split)")
    from .eval_cli import checkpoint_spec, long_eval_config, run_long_eval

    long_cfg = long_eval_config(spec, args, _world_size_from_env())  # checked before any process group
    path = checkpoint_dir(run_dir, args.step)
    if path is None:
        raise SpecError("--step", f"no complete checkpoint {'step_%d ' % args.step if args.step else ''}"
                        f"under {run_dir}/checkpoints")
    spec, trained_len = checkpoint_spec(spec, path, args.overrides)  # a staged run: the checkpoint's RoPE
    if long_cfg is not None:
        return run_long_eval(spec, path, long_cfg, args, trained_len)
    result = evaluate_checkpoint(spec, path)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"{run_dir} step {result['step']}: eval_loss {result['eval_loss']:.4f} "
              f"eval_ppl {result['eval_ppl']:.2f} ({result['eval_tokens']} tokens)", flush=True)
    return 0


def cmd_calibrate(args) -> int:
    import json

    from seqshard.report.calibrate import calibrate, calibrate_model, summarize
    from seqshard.report.calibration_file import save_profile

    model = load_spec(args.spec).model if args.spec else None
    profile = calibrate_model(model, spec_path=args.spec) if model else calibrate()
    print(summarize(profile) if model else json.dumps(profile, indent=1))
    if args.out:
        save_profile(profile, args.out, model)
        print(f"wrote {args.out} (set parallel.planner.profile: {args.out})")
    return 0


def cmd_spec(args) -> int:
    from .spec_reference import reference_markdown

    text = reference_markdown()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_summary(args) -> int:
    from seqshard.train.logs import read_metrics

    m = read_metrics(args.run_dir)
    if not m:
        print(f"seqshard: error: no steps in {args.run_dir}/metrics.jsonl", file=sys.stderr)
        return 2
    tokens, seconds = sum(x["tokens"] for x in m), sum(x["step_time_s"] for x in m)
    print(f"{args.run_dir}: {len(m)} steps, loss {m[0]['loss']:.3f} -> {m[-1]['loss']:.3f}, "
          f"{tokens} tokens in {seconds:.1f}s of steps ({tokens / seconds:.0f} tokens/s), "
          f"peak memory {max(x['peak_mem_mb'] for x in m):.0f} MB per rank")
    return 0


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return {"train": cmd_train, "validate": cmd_validate, "launch": cmd_launch,
                "summary": cmd_summary, "spec": cmd_spec, "eval": cmd_eval, "calibrate": cmd_calibrate, **args._reports}[args.command](args)
    except SpecError as err:
        print(f"seqshard: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"seqshard: error: {err.strerror}: {err.filename}", file=sys.stderr)
        return 2
    except RankFailure as err:  # raised on every rank with the same line: rank 0 prints it
        if _rank() == 0:
            print(f"seqshard: error: {err}", file=sys.stderr)
        return err.exit_code
    except CollectiveError as err:  # a peer died or hung: one line per stranded rank (names the cause if known)
        print(f"seqshard: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # unexpected (a bug): name it for the ranks it strands, keep the traceback
        publish(args.command, err)
        raise


if __name__ == "__main__":
    sys.exit(main())
