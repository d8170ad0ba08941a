"""The README runs as written: every shell and Python block, top to bottom, in one fresh folder
holding a copy of ``configs/``, exactly as a newcomer pastes them (the same run folders, the same
order). Training is shortened by ``ZEROTUNE_SET`` (extra ``--set`` assignments every training verb
applies last); everything else is the README's own text. A block preceded by
``<!-- readme: not run (REASON) -->`` is left out (it needs the network, a GPU or the user's
files); a block with no command in it is sample output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!-- readme: not run \((.+?)\) -->")
FENCE = re.compile(r"^```(\w*)\s*$")
SHORT = "train.max_steps=3 train.eval_every=0 data.eval_batches=2 train.progress=false"


def blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line, language, body, reason to skip or None) of every fenced block of ``text``."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        skip = SKIP.search(before)
        found.append((start + 1, m.group(1), "\n".join(body) + "\n", skip.group(1) if skip else None))
        i += 1
    return found


def commands(body: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for line in body.splitlines():
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line and not line.startswith("#"):
            out.append(line)
    return [c for c in out if re.match(r"(zerotune|make|python|cat|ls|torchrun|echo)\b", c)]


def runnable(text: str) -> list[tuple[int, str, str]]:
    """The blocks the test runs, in order: (line, 'sh' or 'python', code)."""
    chosen = []
    for line, lang, body, skip in blocks(text):
        if skip:
            continue
        if lang == "python":
            chosen.append((line, "python", body))
        elif lang in ("", "bash", "sh") and commands(body):
            chosen.append((line, "sh", "\n".join(commands(body))))
    return chosen


def test_the_block_finder_reads_fences_comments_and_skips():
    text = ("intro\n```\nzerotune train a.yaml   # comment\nzerotune generate r \\\n    --seed 0\n```\n"
            "```\nsample output\n```\n<!-- readme: not run (needs the network) -->\n\n```\nzerotune data x\n```\n"
            "```python\nprint(1)\n```\n```yaml\nseed: 0\n```\n")
    assert runnable(text) == [(2, "sh", "zerotune train a.yaml   # comment\nzerotune generate r --seed 0"),
                              (15, "python", "print(1)\n")]


def test_every_readme_block_has_what_it_needs():
    """The README's blocks are run, but for five that say why (make itself, a download, the
    user's own photos, a server that runs until stopped and its client): a block is never left out
    silently."""
    text = (ROOT / "README.md").read_text()
    skipped = [why for _, _, _, why in blocks(text) if why]
    assert len(skipped) == 5 and len(runnable(text)) >= 8


@pytest.mark.slow
def test_the_readme_runs_top_to_bottom(tmp_path):
    """Every block, in order, in one folder, on the README's own run names: each command exits 0."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "configs", work / "configs")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "ZEROTUNE_SET": SHORT,
           "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    for line, kind, code in runnable((ROOT / "README.md").read_text()):
        steps = code.splitlines() if kind == "sh" else [code]
        for step in steps:
            argv = ["bash", "-c", step] if kind == "sh" else [sys.executable, "-c", step]
            proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"README.md line {line}: {step}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
