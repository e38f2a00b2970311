"""``seqshard sweep | report | simulate``: subcommands registered into the main CLI's parser.

``register(subparsers)`` adds the three subcommands and returns ``{name: handler}``; each handler
takes the parsed args and returns an exit code (0 ok, 1 a run failed, 2 bad input with one line
on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seqshard.launch.spec import SpecError

SWEEP_EPILOG = """examples:
  seqshard sweep examples/sweep.yaml --world 1,2,4 --dry-run
  seqshard sweep examples/sweep.yaml --world 1,2,4 --set parallel.sp_method=ulysses,ring \\
      --set parallel.sp=world --skip-invalid --out runs/sweep-methods
  seqshard sweep examples/sweep.yaml --world 1,2,4 --set data.tokens_per_step=1024*world   # weak scaling
values: a --set with commas is an axis of the product; 'world' and '<int>*world' become the world size
(times the integer) of each combination. Each run goes to OUT/<combo>/ with spec.yaml and run.json.
"""
REPORT_EPILOG = """examples:
  seqshard report runs/sweep-sweep --out docs/report
  seqshard report runs/sweep-a runs/sweep-b/w4 --out report --peak-tflops 989
  seqshard report runs/sweep-*/ --out report --profile h100_nvlink_ib400
writes report.md, report.html (plots embedded), report.json and one PNG per plot into --out.
"""
SIMULATE_EPILOG = """examples:
  seqshard simulate examples/sweep.yaml --devices 8,64,512 --seq-len 32K,256K,1M --out report-sim
  seqshard simulate job.yaml --devices 8,16,32,64,128,256,512,1024 --seq-len 32K,128K,1M,4M \\
      --profile h100_nvlink_ib400 --methods ulysses,ring,usp --out docs/simulated
  seqshard simulate examples/sweep.yaml --calibrate-from runs/sweep-sweep --out docs/simulated/calibration
sizes take K (1024) and M (1024^2) suffixes. Every figure is PREDICTED by the cost model.
"""


def _fail(msg: str) -> int:
    print(f"seqshard: error: {msg}", file=sys.stderr)
    return 2


def _raw(sub, name, help_, description, epilog):
    return sub.add_parser(name, help=help_, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_peak(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--peak-tflops", type=float, metavar="X", help="per-device peak TFLOP/s for MFU")
    g.add_argument("--profile", metavar="NAME", help="hardware profile (seqshard.parallel.hardware) giving "
                   "the per-device peak FLOP/s (and, for simulate, the links)")


def register(sub) -> dict:
    """Add ``sweep``, ``report`` and ``simulate`` to an argparse subparsers object."""
    p = _raw(sub, "sweep", "run a spec over world sizes x --set values, one run after another",
             "Validate every combination of --world and comma-separated --set values up front, then run "
             "each through the spec's launcher into its own folder.", SWEEP_EPILOG)
    p.add_argument("spec", help="YAML job spec")
    p.add_argument("--world", required=True, metavar="N,N,...", help="world sizes (launch.nproc_per_node)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=V1,V2",
                   help="an axis of the sweep (repeatable); one value = a plain override")
    p.add_argument("--out", metavar="DIR", help="sweep folder (default runs/sweep-<spec name>)")
    p.add_argument("--dry-run", action="store_true", help="list the combinations and commands; start nothing")
    p.add_argument("--skip-invalid", action="store_true", help="run the valid combinations when some are "
                   "invalid (default: report them and start nothing)")
    p = _raw(sub, "report", "scaling report (tables + plots) from run folders",
             "Throughput, strong/weak scaling efficiency, MFU, communication fraction and peak memory "
             "of every run folder (metrics.jsonl + run.json) at or under the given paths.", REPORT_EPILOG)
    p.add_argument("runs", nargs="+", help="run folders or folders holding them (e.g. a sweep folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="where report.md/html and the PNGs go")
    p.add_argument("--title", default="seqshard scaling report (measured)")
    p.add_argument("--tokens", metavar="N", help="recommend the fastest and the cheapest configuration "
                   "to train N tokens (e.g. 2B, 500M), from measured and PREDICTED points")
    p.add_argument("--min-efficiency", type=float, default=0.7, metavar="E", help="efficiency a recommended "
                   "configuration must reach (per-device tokens/s against 1 device; default 0.7)")
    p.add_argument("--note", action="append", default=[], metavar="TEXT", help="a line for the report's "
                   "notes, e.g. the machine (repeatable)")
    _add_peak(p)
    p = _raw(sub, "simulate", "PREDICTED step time, MFU and memory of every SP method at cluster scale",
             "Predict, from the cost model and a hardware profile, each SP method's step time, MFU and "
             "memory per device over device counts and sequence lengths; same report format, "
             "marked PREDICTED.", SIMULATE_EPILOG)
    p.add_argument("spec", help="YAML job spec (its model: section is simulated)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec key (repeatable), e.g. --set model.n_layers=32")
    p.add_argument("--devices", default="8,16,32,64,128,256,512,1024", metavar="N,N,...")
    p.add_argument("--seq-len", default="32K,256K,1M,4M", metavar="L,L,...", help="tokens per sequence")
    p.add_argument("--tokens-per-device", default="8K", metavar="T", help="weak-scaling load: the global "
                   "batch is devices x T tokens, at least one sequence (default 8K)")
    p.add_argument("--methods", default="ulysses,ring,usp,allgather,lasp2,adaptive", metavar="M,M,...")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--memory", action="store_true", help="instead: the longest sequence that fits each "
                   "--devices count by the memory model (one sequence over all devices), beside published figures")
    p.add_argument("--calibrate-from", nargs="+", metavar="RUN", help="measured run folders: put the "
                   "prediction for each beside its measurement (cpu_gloo profile unless --profile)")
    _add_peak(p)
    return {"sweep": cmd_sweep, "report": cmd_report, "simulate": cmd_simulate}


def cmd_sweep(args) -> int:
    from .sweep import default_out, parse_axes, parse_worlds, sweep

    if not Path(args.spec).is_file():
        return _fail(f"spec {args.spec} not found")
    try:
        worlds, axes = parse_worlds(args.world), parse_axes(args.overrides)
    except SpecError as err:
        return _fail(str(err))
    out = Path(args.out) if args.out else default_out(args.spec)
    return sweep(args.spec, worlds, axes, out, dry_run=args.dry_run, skip_invalid=args.skip_invalid,
                 log=lambda line: print(line, flush=True))


def _peak(args):
    """(per-device peak TFLOP/s or None, a note saying where it came from)."""
    if args.peak_tflops:
        return args.peak_tflops, f"MFU against --peak-tflops {args.peak_tflops:g} TFLOP/s per device"
    if args.profile:
        from .simulate import load_profile, profile_peak_tflops

        hw = load_profile(args.profile)
        peak = profile_peak_tflops(hw)
        return peak, f"MFU against profile {args.profile}: {peak:g} TFLOP/s per device"
    return None, "no --peak-tflops or --profile: MFU left out, model TFLOP/s per device shown instead"


def cmd_report(args) -> int:
    from . import report
    from .simulate import SimulateError

    try:
        peak, peak_note = _peak(args)
        rows = report.collect(args.runs, peak)
    except (report.ReportError, SimulateError, SpecError) as err:
        return _fail(str(err))
    notes = [f"{len(rows)} runs from {', '.join(args.runs)}", "first step (warmup) left out of every average",
             peak_note, "formulas: see the docstring of seqshard/report/report.py (MFU with the causal "
             "attention term 6 * d * sum L_i^2 per softmax layer)", *args.note]
    written = report.write_report(rows, args.out, args.title, notes)
    from .long_eval import add_to_report as add_long_eval

    written.update({p.name: p for p in add_long_eval(args.out, args.runs)})  # runs with train.eval_long
    print(report.markdown_table(rows))
    if args.tokens:
        from .recommend import add_to_report, parse_tokens

        try:
            rec = add_to_report(args.out, rows, parse_tokens(args.tokens), args.min_efficiency)
        except (report.ReportError, SimulateError) as err:
            return _fail(str(err))
        print("\n" + rec["section"], end="")
    print(f"wrote {', '.join(sorted(written))} into {args.out}")
    return 0


def cmd_simulate(args) -> int:
    from . import simulate

    try:
        return simulate.run_cli(args)
    except (simulate.SimulateError, SpecError) as err:
        return _fail(str(err))
