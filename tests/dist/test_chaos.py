"""The chaos bench as a test (slow profile): every fault of ``bench/chaos.py`` tried once on real
2-rank torchrun jobs; each must survive (resume equals the uninterrupted run), SIGTERM must lose
0 steps, and a SIGSTOPped rank must end the job within the collective timeout + a few seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.training import ROOT


@pytest.mark.slow
def test_chaos_every_fault_is_survived(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--tries", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    result = json.loads(out.read_text())
    table = result["table"]
    for fault, row in table.items():
        bad = [r for r in result["rows"] if r["fault"] == fault and r["survived"] is False]
        assert row["survived"] + row["skipped"] == row["tried"], (fault, bad)
    assert max(table["sigterm"]["steps_lost"]) == 0 and max(table["sigusr1"]["steps_lost"]) == 0
    assert max(table["sigstop"]["exit_s"]) <= result["timeout_s"] + 5
    assert all(r["steps_lost"] <= 1 for r in result["rows"] if r["steps_lost"] is not None)  # a checkpoint a step
    assert proc.returncode == 0, proc.stdout[-3000:]
