"""Resuming after config.yaml was edited: what the checkpoint cannot honour is one line, exit 2, with the
run untouched; what it can (the learning rate, betas, the schedule) applies from the resumed step on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config
from tests.reliability.common import snapshot
from zerotune.cli import main
from zerotune.train import checkpoint as ckpt
from zerotune.train.api import train


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    cfg = tiny_config(epochs=None, max_steps=6, checkpoint_every=2, keep_last=5, log_every=1)
    return train(cfg, out=tmp_path_factory.mktemp("edits") / "run", log=lambda *a: None)


def stopped_at_step_2(finished: Path, to: Path) -> Path:
    """The finished run as if it had stopped after its step-2 checkpoint."""
    shutil.copytree(finished, to)
    for name in ("model.json", "model.safetensors"):
        (to / name).unlink()
    for step in (4, 6):
        shutil.rmtree(to / "checkpoints" / ckpt.step_name(step))
    return to


def edit(run: Path, dotted: str, value) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.mark.parametrize("key, value", [("model.hidden", [48]), ("model.activation", "tanh"), ("model.norm", "layer"),
                                        ("optim.name", "sgd"), ("optim.weight_decay", 0.01)])
def test_a_change_the_checkpoint_cannot_honour_is_one_line_and_touches_nothing(finished, tmp_path, capsys, key,
                                                                              value):
    run = stopped_at_step_2(finished, tmp_path / "run")
    edit(run, key, value)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    step2 = run / "checkpoints" / ckpt.step_name(2)
    assert len(err) == 1 and err[0].startswith(f"error: {step2}: {key}: the run's config.yaml says "), err
    assert "put it back to resume, or start a new run" in err[0]
    assert snapshot(run) == before  # no new TensorBoard file, metrics.jsonl as it was


def test_an_edited_learning_rate_applies_from_the_resumed_step(finished, tmp_path):
    run = stopped_at_step_2(finished, tmp_path / "run")
    edit(run, "optim.lr", 0.0005)
    assert main(["train", "--resume", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert [lrs[s] for s in (1, 2)] == [0.003, 0.003] and [lrs[s] for s in (3, 4, 5, 6)] == [0.0005] * 4


def test_resuming_unchanged_is_still_exact(finished, tmp_path):
    run = stopped_at_step_2(finished, tmp_path / "run")
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "model.safetensors").read_bytes() == (finished / "model.safetensors").read_bytes()


def test_every_step_checkpoint_damaged_stops_instead_of_starting_over(finished, tmp_path, capsys):
    run = stopped_at_step_2(finished, tmp_path / "run")
    (run / "checkpoints" / ckpt.step_name(2) / ckpt.WEIGHTS).write_bytes(b"rot")
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert main(["train", "--resume", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert err == [f"error: {run / 'checkpoints'}: every step checkpoint is damaged; best/ verifies: copy it to "
                   "checkpoints/step-NNNNNN (its step) to resume from it; nothing was changed (starting again at "
                   "step 0 would replace metrics.jsonl)"]
    assert (run / "metrics.jsonl").read_text() == before
