"""Tiny source runs for the compression tests: a digits MLP, a character GPT, and a LoRA run on that GPT."""

from __future__ import annotations

from pathlib import Path

import pytest

import zerotune
from tests.conftest import tiny_config
from tests.helpers import write_char_shards

QUIET = {"log": lambda *_: None}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to show that a run was not touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    cfg = tiny_config(epochs=1)
    return zerotune.train(cfg, out=tmp_path_factory.mktemp("digits") / "mlp", **QUIET)


def gpt_config(shards: Path) -> dict:
    return {"seed": 0, "task": "causal_lm", "data": {"train": f"shards:{shards}", "eval_batches": 2},
            "model": {"arch": "gpt", "block_size": 16, "n_layer": 1, "n_head": 2, "d_model": 16, "dropout": 0.0},
            "optim": {"name": "adamw", "lr": 0.01},
            "train": {"epochs": None, "max_steps": 20, "batch_size": 8, "progress": False, "metrics": []}}


@pytest.fixture(scope="session")
def gpt_shards(tmp_path_factory) -> Path:
    return write_char_shards(tmp_path_factory.mktemp("corpus"), "the cat sat on the mat. " * 4, 12, 0.25)


@pytest.fixture(scope="session")
def gpt_run(gpt_shards, tmp_path_factory) -> Path:
    return zerotune.train(gpt_config(gpt_shards), out=tmp_path_factory.mktemp("gpt") / "run", **QUIET)


@pytest.fixture(scope="session")
def gpt_lora_run(gpt_run, gpt_shards, tmp_path_factory) -> Path:
    cfg = gpt_config(gpt_shards)
    del cfg["model"]  # the model is the source's
    cfg["train"]["max_steps"] = 3
    cfg["optim"]["lr"] = 0.05  # large enough steps that the adapters change the function
    return zerotune.finetune(cfg, gpt_run, method="lora", out=tmp_path_factory.mktemp("lora") / "run", **QUIET)
