"""Non-finite loss or gradients: ``stop`` ends the run with exit 1; ``skip`` drops the update
and goes on, up to ``train.max_skips``; beyond that, exit 1 with the last good checkpoint kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tests.conftest import tiny_config
from tests.reliability.common import write_config, zt
from zerotune import files
from zerotune.cli import main
from zerotune.errors import RunFailed
from zerotune.train import checkpoint as ckpt
from zerotune.train.api import train
from zerotune.train.tasks import SupervisedTask

QUIET = {"log": lambda *a: None}


@pytest.fixture
def nan_at(monkeypatch):
    """Make the batches of the given steps hold a NaN input."""

    def inject(*steps: int) -> None:
        real = SupervisedTask.batch

        def batch(self, step):
            x, y = real(self, step)
            if step in steps:
                x = x.clone()
                x[0].view(-1)[0] = float("nan")
            return x, y

        monkeypatch.setattr(SupervisedTask, "batch", batch)

    return inject


def optimizer_tensors(folder):
    state = ckpt.load_checkpoint(folder)[1]["optimizer"]["state"]
    return {(p, k): v for p, s in state.items() for k, v in s.items() if isinstance(v, torch.Tensor)}


def test_skip_drops_exactly_the_bad_update(tmp_path, nan_at):
    nan_at(5)
    logs = []
    cfg = tiny_config(epochs=1, max_steps=6, on_nonfinite="skip", max_skips=2, checkpoint_every=1, keep_last=100)
    run = train(cfg, out=tmp_path / "r", log=logs.append)
    assert [m for m in logs if m.startswith("warning")] == [
        "warning: step 5: non-finite loss; update skipped (1/2)"]
    before = ckpt.load_checkpoint(run / "checkpoints" / "step-000005")[0]
    after = files.load_weights(run / "model.safetensors")  # the step-6 weights: the update at step 5 was dropped
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    a = optimizer_tensors(run / "checkpoints" / "step-000005")
    b = optimizer_tensors(run / "checkpoints" / "step-000006")
    for k in a:  # Adam's moments untouched by the NaN gradients (its step counter too)
        assert torch.equal(a[k], b[k]), k


def test_skip_continues_training(tmp_path, nan_at):
    nan_at(5)
    cfg = tiny_config(epochs=1, on_nonfinite="skip", max_skips=1)
    run = train(cfg, out=tmp_path / "r", **QUIET)
    final = files.load_weights(run / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())
    meta = json.loads((run / "model.json").read_text())
    assert meta["finished"] and meta["step"] == 21  # 1,294 examples / 64 per batch


def test_more_skips_than_allowed_fails_and_keeps_the_last_good_checkpoint(tmp_path, nan_at):
    nan_at(5, 7, 8)
    cfg = tiny_config(epochs=1, on_nonfinite="skip", max_skips=2, checkpoint_every=1)
    with pytest.raises(RunFailed, match=r"^step 8: the loss is not finite \(loss=nan\).*last good checkpoint is kept"):
        train(cfg, out=tmp_path / "r", **QUIET)
    last = ckpt.latest_checkpoint(tmp_path / "r" / "checkpoints")
    assert last.name == "step-000007" and ckpt.verify(last) is None
    weights, state = ckpt.load_checkpoint(last)
    assert state["loop"]["skips"] == 1
    assert all(torch.isfinite(v).all() for v in weights.values())


def nan_arrays(tmp_path):
    """Digits as arrays:FILE.npz whose example 0 overflows the first layer to inf (its pixels are 3e38:
    finite, so the data passes the reader's NaN check), so exactly one batch per epoch is bad."""
    d = load_digits()
    x = d.data.astype(np.float32)
    x[0, :] = 3.0e38
    path = tmp_path / "nan.npz"
    np.savez(path, x=x, y=d.target.astype(np.int64))
    cfg = tiny_config(epochs=3, checkpoint_every=2)
    cfg["data"] = {"train": f"arrays:{path}", "normalize": False, "val_split": 0, "test_split": 0}
    return cfg


def test_stop_via_cli_exits_1_with_one_line(tmp_path):
    config = write_config(tmp_path / "c.yaml", nan_arrays(tmp_path))
    p = zt("train", config, "--out", tmp_path / "run")
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: step "), p.stderr
    assert "the loss is not finite" in lines[0] and "last good checkpoint is kept" in lines[0]
    step = int(lines[0].split()[2].rstrip(":"))
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last is None or int(last.name.split("-")[1]) <= step


def test_skip_beyond_max_skips_via_cli_exits_1(tmp_path, capfd):
    cfg = nan_arrays(tmp_path)
    cfg["train"] |= {"on_nonfinite": "skip", "max_skips": 1}
    config = write_config(tmp_path / "c.yaml", cfg)
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 1
    out, err = capfd.readouterr()
    skipped = [ln for ln in out.splitlines() if ln.startswith("warning: step ")]
    assert len(skipped) == 1 and skipped[0].endswith("update skipped (1/1)"), out
    first = int(skipped[0].split()[2].rstrip(":"))
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "the loss is not finite" in lines[0], err
    second = int(lines[0].split()[2].rstrip(":"))
    assert first < 21 <= second < 42  # one bad batch in each epoch of 21 steps
    last = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.verify(last) is None and first < int(last.name.split("-")[1]) <= second


class SqrtAtZero(torch.nn.Module):
    """Finite outputs, but d√s/ds at s = 0 is inf: a non-finite gradient under a finite loss."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.s = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.linear(x) + torch.sqrt(self.s)


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_nonfinite_gradient_under_a_finite_loss_stops_at_its_step(grad_clip):
    from zerotune.config import Config
    from zerotune.data.base import Split
    from zerotune.data.splits import Data
    from zerotune.spec import DataInfo
    from zerotune.train.loop import train_loop

    g = torch.Generator().manual_seed(0)
    split = Split(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))
    data = Data(split, None, None, DataInfo("tabular", [4], classes=["a", "b", "c"]))
    task = SupervisedTask(data, batch_size=8, seed=0, loss="auto", label_smoothing=0.0, metrics=[])
    model = SqrtAtZero()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = Config.model_validate({"train": {"epochs": 1, "progress": False, "grad_clip": grad_clip}})
    with pytest.raises(RunFailed, match=r"^step 0: the gradient norm is not finite \(loss=[0-9.]+\)"):
        train_loop(model, task, cfg, device=torch.device("cpu"), log=lambda *a: None)
    for k, v in model.state_dict().items():  # the bad update was never applied
        assert torch.equal(v, before[k]), k
