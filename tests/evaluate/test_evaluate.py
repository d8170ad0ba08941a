import json

import numpy as np
import pytest
import torch

import zerotune
from tests.conftest import tiny_config
from zerotune.config import load_config
from zerotune.data.splits import load_data
from zerotune.evaluate.api import evaluate
from zerotune.load import load_run
from zerotune.train.api import train


def test_evaluated_examples_are_disjoint_from_training_examples(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    x = rng.normal(size=(n, 5)).astype(np.float32)
    x[:, 0] = np.arange(n)  # an id column: each example is unique
    y = (x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = tiny_config(epochs=1)
    cfg["data"] = {"train": f"arrays:{tmp_path / 'd.npz'}", "test_split": 0.2, "val_split": 0.1, "normalize": False}
    run = train(cfg, out=tmp_path / "r", log=lambda *a: None)
    result = evaluate(run)
    data = load_data(load_config(run / "config.yaml").data, "classification", 0)
    test = data.test
    test_ids, train_ids = set(test.x[:, 0].tolist()), set(data.train.x[:, 0].tolist())
    assert result["n"] == len(test_ids) == 60
    assert not test_ids & train_ids
    assert not test_ids & set(data.val.x[:, 0].tolist())


def test_regression_run_reports_data_units(tmp_path):
    cfg = tiny_config(epochs=3)
    cfg |= {"task": "regression", "data": {"train": "builtin:diabetes"}}
    cfg["train"]["metrics"] = ["mse", "mae", "r2"]
    run = train(cfg, out=tmp_path / "r", log=lambda *a: None)
    result = evaluate(run)
    loaded = load_run(run)
    test = load_data(load_config(run / "config.yaml").data, "regression", 0).test
    with torch.no_grad():
        pred = loaded.preprocess.y_inverse(loaded.model(test.x).reshape(-1))
    truth = loaded.preprocess.y_inverse(test.y)
    assert abs(result["mae"] - float((pred - truth).abs().mean())) < 1e-3
    assert result["mse"] > 100  # in squared disease-progression units, not standardised ones


@pytest.mark.parametrize("train", [{"label_smoothing": 0.2}, {"loss": "bce"}, {}])
def test_eval_loss_is_the_training_loss_on_the_same_split(tmp_path, train):
    """eval.json's loss on the val split is metrics.jsonl's last val_loss: the same weights, the same loss
    (label smoothing, one-vs-rest BCE), not a plain cross-entropy."""
    run = zerotune.train(tiny_config(epochs=2, **train), out=tmp_path / "r", log=lambda *a: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val_loss" in r][-1]
    assert last["step"] == rows[-1]["step"]  # evaluated with the final weights
    result = zerotune.evaluate(run, split="val")
    assert result["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert result["accuracy"] == pytest.approx(last["val_accuracy"], rel=1e-6)
