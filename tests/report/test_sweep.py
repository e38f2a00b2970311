"""``seqshard sweep``: the combinations, their validation up front, and one real 2-run sweep."""
import argparse
import json

import pytest

from seqshard.report import report
from seqshard.report.cli import register
from seqshard.report.sweep import plan, parse_axes, resolve
from tests.helpers.training import ROOT, SMALL

SPEC = str(ROOT / "examples" / "sweep.yaml")


def _cli(argv):
    ap = argparse.ArgumentParser()
    handlers = register(ap.add_subparsers(dest="command"))
    args = ap.parse_args(argv)
    return handlers[args.command](args)


def test_product_of_worlds_and_values_with_world_substitution(tmp_path):
    axes = parse_axes(["parallel.sp_method=none,ulysses", "parallel.sp=world", "data.tokens_per_step=512*world"])
    combos = plan(SPEC, [1, 2, 4], axes, out=tmp_path)
    assert [c.name for c in combos] == ["w1_sp_method=none", "w1_sp_method=ulysses", "w2_sp_method=none",
                                        "w2_sp_method=ulysses", "w4_sp_method=none", "w4_sp_method=ulysses"]
    valid = {c.name: c.spec for c in combos if not c.error}
    assert set(valid) == {"w1_sp_method=none", "w1_sp_method=ulysses", "w2_sp_method=ulysses",
                          "w4_sp_method=ulysses"}
    w4 = valid["w4_sp_method=ulysses"]
    assert (w4.world_size, w4.parallel.sp, w4.data.tokens_per_step) == (4, 4, 2048)
    assert w4.train.output_dir == str(tmp_path / "w4_sp_method=ulysses")
    bad = {c.name: c.error for c in combos if c.error}
    assert bad["w2_sp_method=none"].startswith("parallel.sp_method: none cannot run sp 2")
    assert resolve("world", 8) == "8" and resolve("3*world", 8) == "24" and resolve("ring", 8) == "ring"
    weak = plan(SPEC, [1, 2, 4], parse_axes(["data.tokens_per_step=2048,512*world"]), out=tmp_path)
    assert [c.name for c in weak] == ["w1_tokens_per_step=2048", "w1_tokens_per_step=512", "w2_tokens_per_step=2048",
                                      "w2_tokens_per_step=1024", "w4_tokens_per_step=2048"]  # w4: one run, not two


def test_dry_run_lists_commands_and_rejects_invalid_with_one_line_each(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", SPEC, "--world", "1,2,3", "--set", "parallel.sp_method=ulysses",
            "--set", "parallel.sp=2", "--out", str(out), "--dry-run"]
    assert _cli(argv) == 2  # invalid combinations and no --skip-invalid: nothing runs
    lines = capsys.readouterr().out.splitlines()
    invalid = [ln for ln in lines if ln.startswith("invalid:")]
    assert invalid == ["invalid: w1: parallel.sp: 2 does not divide world size 1",
                       "invalid: w3: parallel.sp: 2 does not divide world size 3"]
    assert _cli(argv + ["--skip-invalid"]) == 0
    text = capsys.readouterr().out
    assert "w2: world 2 = dp 1 x sp 2 (ulysses)" in text
    assert "--nproc-per-node=2" in text and "--set launch.nproc_per_node=2" in text
    assert "1 runs, 2 invalid skipped (dry run: nothing started)" in text
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--world", "1,x"], "--world: '1,x' is not a comma-separated list of integers"),
    (["--world", "0"], "--world: '0' must list world sizes >= 1"),
    (["--world", "1", "--set", "train.steps"], "--set: 'train.steps' is not key.path=value"),
    (["--world", "1", "--set", "launch.launcher=slurm"], "invalid: w1: launch.launcher: sweep runs locally"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert _cli(["sweep", SPEC, "--out", str(tmp_path), "--dry-run", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err + captured.out


def test_real_sweep_of_two_runs_then_report(tmp_path, capsys):
    """world 1 and 2, 3 steps each, through torchrun; then the report reads both folders."""
    out = tmp_path / "sw"
    small = [o for o in SMALL if not o.startswith("train.steps")] + ["train.steps=3"]
    argv = ["sweep", SPEC, "--world", "1,2", "--out", str(out)] + [a for o in small for a in ("--set", o)]
    assert _cli(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("[")] == ["[1/2] w1", "[2/2] w2"]
    for world in (1, 2):
        run_dir = out / f"w{world}"
        info = json.loads((run_dir / "run.json").read_text())
        assert (info["world_size"], info["returncode"], info["combo"]) == (world, 0, f"w{world}")
        assert [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    rows = {r["name"]: r for r in report.collect([out])}
    assert rows["w2"]["strong_eff"] == pytest.approx(rows["w1"]["step_time_s"] / (2 * rows["w2"]["step_time_s"]))
