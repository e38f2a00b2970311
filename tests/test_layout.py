"""The package's rooms (DESIGN.md): lower rooms never import higher ones, models never import
torch.distributed, and importing the kernels pulls in no training, launch or report code."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "seqshard"
UPPER = ("seqshard.train", "seqshard.launch", "seqshard.report")
LOWER = ["kernels", "models", "parallel", "dist", "data"]


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_lower_rooms_never_import_upper_rooms():
    offenders = [(str(f.relative_to(PKG)), m) for room in LOWER for f in (PKG / room).rglob("*.py")
                 for m in imported_modules(f) if m.startswith(UPPER)]
    assert not offenders, offenders


def test_models_and_kernels_never_import_torch_distributed():
    offenders = [(str(f.relative_to(PKG)), m) for room in ("models", "kernels") for f in (PKG / room).rglob("*.py")
                 for m in imported_modules(f) if m.startswith("torch.distributed")]
    assert not offenders, offenders


def test_importing_kernels_loads_only_kernels():
    code = ("import sys, seqshard.kernels; "
            "print(sorted(m for m in sys.modules if m.startswith('seqshard.') and not m.startswith('seqshard.kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
