"""The documentation is checked (``make docs-check`` runs this file; it is in the default suite):
every relative link of README.md and docs/ resolves, every docs/*.md page is one hop from the README,
and every command block marked runnable (a ``<!-- runnable -->`` line right above the fence)
exits 0. A failure names the file and line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _links(page: Path):
    in_code = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            for target in LINK.findall(line):
                yield number, target


def _runnable_blocks(page: Path):
    lines = page.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "<!-- runnable -->" and i + 1 < len(lines) and lines[i + 1].startswith("```"):
            block, j = [], i + 2
            while j < len(lines) and not lines[j].startswith("```"):
                block.append((j + 1, lines[j]))
                j += 1
            yield block


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for number, target in _links(page):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} line {number}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_one_hop_from_the_readme():
    linked = {(ROOT / t.split("#")[0]).resolve() for _, t in _links(ROOT / "README.md")}
    guide = sorted((ROOT / "docs").glob("*.md"))  # the guide; docs/<folder>/ hold generated reports
    unreachable = [str(p.relative_to(ROOT)) for p in guide if p.resolve() not in linked]
    assert not unreachable, f"docs pages the README does not link: {unreachable}"


@pytest.mark.parametrize("page", [p for p in PAGES if list(_runnable_blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_command_blocks_exit_0(page, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for block in _runnable_blocks(page):
        for number, line in block:
            command = line.split(" #")[0].strip()
            if not command or command.startswith(("#", "$ ")) or command.startswith(". "):
                continue
            proc = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, (f"{page.relative_to(ROOT)} line {number}: `{command}` exited "
                                          f"{proc.returncode}: {proc.stderr[-1500:]}")
