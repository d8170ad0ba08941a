"""data.classes (keep only some labels) and builtin:docstrings (text classification from the standard library)."""

from __future__ import annotations

import pytest
import torch

from zerotune.config import DataConfig, load_config
from zerotune.data.sources import load_source
from zerotune.data.splits import load_data
from zerotune.errors import ZerotuneError


def test_classes_keeps_and_reindexes_labels():
    full = load_source("builtin:digits")
    cfg = DataConfig(classes=[7, 3], test_split=0.0, val_split=0.0, normalize=False)
    data = load_data(cfg)
    assert data.info.classes == ["7", "3"]
    keep = (full.train.y == 7) | (full.train.y == 3)
    torch.testing.assert_close(data.train.x, full.train.x[keep], rtol=0, atol=0)
    torch.testing.assert_close(data.train.y, (full.train.y[keep] == 3).long(), rtol=0, atol=0)  # 7 → 0, 3 → 1


def test_unknown_class_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  classes: [3, 42]\n")
    expected = r"data.classes: labels \['42'\] do not occur in data spec 'builtin:digits'"
    with pytest.raises(ZerotuneError, match=expected):
        load_data(load_config(path).data)
    with pytest.raises(ZerotuneError, match="data.classes: data spec 'builtin:diabetes' has no class labels"):
        load_data(DataConfig(train="builtin:diabetes", classes=["1"]), "regression")


def test_docstrings_builtin_is_labelled_text():
    src = load_source("builtin:docstrings", DataConfig(max_length=16))
    assert src.info.kind == "tokens" and src.info.classes == ["files", "math", "text", "time"]
    assert src.train.x.shape == (len(src.train), 16) and len(src.train) > 500
    assert torch.bincount(src.train.y).min() > 50  # every topic well represented
    assert src.tokenizer.decode(src.train.x[0].tolist()).strip()  # real text, not padding
