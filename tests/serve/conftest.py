"""A small decoder run trained on CPython's documentation, and a real server on a free loopback port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def train_text_run(root: Path) -> Path:
    """A character-level GPT (2 layers, d_model 64, block 96) trained for 300 steps on 30 pydoc topics."""
    from pydoc_data.topics import topics

    from zerotune.data.shards import prepare
    from zerotune.data.tokenizer import train_tokenizer
    from zerotune.train.api import train

    docs = root / "docs"
    docs.mkdir()
    for name in sorted(topics)[:30]:
        (docs / f"{name}.txt").write_text(topics[name][:1500])
    train_tokenizer(f"text:{docs}", 128, root / "tok", kind="char", progress=False)
    prepare(f"text:{docs}", root / "tok", root / "shards", val_fraction=0.1, progress=False)
    cfg = {
        "seed": 0, "task": "causal_lm",
        "data": {"train": f"shards:{root / 'shards'}", "eval_batches": 1},
        "model": {"arch": "gpt", "block_size": 96, "n_layer": 2, "n_head": 2, "d_model": 64, "dropout": 0.0},
        "optim": {"name": "adamw", "lr": 0.005, "weight_decay": 0.0},
        "schedule": {"name": "cosine", "warmup_steps": 20},
        "train": {"epochs": None, "max_steps": 300, "batch_size": 16, "log_every": 50, "eval_every": 300,
                  "progress": False, "metrics": []},
    }
    return train(cfg, out=root / "run", log=lambda *a: None)


def slow_run(root: Path, text_run: Path) -> Path:
    """A wider GPT (8 layers, d_model 512, block 512) after one step: slow enough per token (milliseconds
    on a CPU) that a test can act while it generates. It reads text_run's shards and tokenizer."""
    from zerotune.train.api import train

    cfg = {
        "seed": 0, "task": "causal_lm",
        "data": {"train": f"shards:{text_run.parent / 'shards'}", "eval_batches": 1},
        "model": {"arch": "gpt", "block_size": 512, "n_layer": 8, "n_head": 8, "d_model": 512, "dropout": 0.0},
        "optim": {"name": "adamw", "lr": 0.001},
        "train": {"epochs": None, "max_steps": 1, "batch_size": 2, "eval_every": 1, "progress": False,
                  "metrics": []},
    }
    return train(cfg, out=root / "slow", log=lambda *a: None)


@pytest.fixture(scope="session")
def text_run(tmp_path_factory) -> Path:
    return train_text_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def slow(tmp_path_factory, text_run) -> Path:
    return slow_run(tmp_path_factory.mktemp("slow"), text_run)


class Server:
    """``zerotune serve`` in a child process on a free loopback port; stopped by :meth:`stop`."""

    def __init__(self, run: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "zerotune", "serve", str(run), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        line = self.proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not found:
            self.stop()
            raise RuntimeError(f"the server did not start: {line}{self.proc.stdout.read() if self.proc.stdout else ''}")
        self.url = f"http://127.0.0.1:{found.group(1)}"
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if json.load(r)["status"] == "ok":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(text_run):
    s = Server(text_run, "--max-batch", "4", "--max-queue", "32", "--threads", "1")
    yield s
    s.stop()
