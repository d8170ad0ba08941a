"""Shared pieces of the reliability tests: the CLI in a subprocess, the run config, comparisons."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from tests.conftest import tiny_config
from zerotune import files

ZT = [sys.executable, "-m", "zerotune"]
ROOT = Path(__file__).resolve().parents[2]


def run_config(**train) -> dict:
    """A digits MLP with dropout (so resuming must restore the RNG), one thread (so a subprocess
    and this process compute bit-identical floats), a checkpoint every 3 steps, a log line per step."""
    cfg = tiny_config(epochs=5, log_every=1, checkpoint_every=3, num_threads=1, **train)
    cfg["model"]["dropout"] = 0.2
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict[str, str]:
    # unbuffered: lines printed before a SIGKILL must reach the log file
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def zt(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*ZT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env())


def start(args: list, log: Path) -> subprocess.Popen:
    """``zerotune ARGS`` in the background, stdout and stderr into ``log`` and ``log.err``."""
    out = open(log, "w")
    err = open(f"{log}.err", "w")
    return subprocess.Popen([*ZT, *map(str, args)], stdout=out, stderr=err, env=env())


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written right now
    return steps


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 300) -> int:
    """Poll metrics.jsonl until it logs ``step`` or more; return the last logged step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = logged_steps(run)
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.002)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def metrics_without_timing(run: Path) -> list[dict]:
    """metrics.jsonl records without the throughput fields (which depend on the wall clock)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_per_sec")} for r in rows]


def assert_same_final_weights(a: Path, b: Path) -> None:
    wa, wb = files.load_weights(a / "model.safetensors"), files.load_weights(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def assert_same_metrics(run: Path, reference: Path) -> None:
    got, want = metrics_without_timing(run), metrics_without_timing(reference)
    steps = [r["step"] for r in got]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.jsonl: {steps}"
    assert steps == [r["step"] for r in want], "missing or extra steps in metrics.jsonl"
    assert got == want


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its SHA-256, to show that nothing in it changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
