import pytest
import torch

from zerotune.evaluate import metrics as M


def logits_for(pred, k):
    return torch.nn.functional.one_hot(torch.tensor(pred), k).float() * 5


def test_classification_metrics_match_hand_computation():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = [0, 0, 1, 1, 2, 2]
    out = M.classification_metrics(logits_for(pred, 3), y, ["accuracy", "precision", "recall", "f1"])
    # per class: P = (1, 1/2, 1/2), R = (2/3, 1/2, 1), F1 = (0.8, 0.5, 2/3)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert out["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert out["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    cm = M.confusion_matrix(logits_for(pred, 3), y)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    per = M.per_class(logits_for(pred, 3), y, ["a", "b", "c"])
    assert per["c"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}


def test_topk_and_auroc():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0]])
    y = torch.tensor([1, 2, 2])
    out = M.classification_metrics(logits, y, ["accuracy", "top2_accuracy", "auroc"])
    assert out["accuracy"] == 0 and out["top2_accuracy"] == pytest.approx(1.0)
    assert 0 <= out["auroc"] <= 1


def test_regression_metrics():
    pred, y = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 3.0])
    out = M.regression_metrics(pred, y, ["mse", "mae", "r2"])
    assert out["mse"] == pytest.approx(2 / 3) and out["mae"] == pytest.approx(2 / 3)
    assert out["r2"] == pytest.approx(1 - 2 / ((1 - 7 / 3) ** 2 + 2 * (3 - 7 / 3) ** 2), rel=1e-5)  # float32


def test_unknown_metric_name():
    from zerotune.errors import ZerotuneError

    with pytest.raises(ZerotuneError, match="unknown metric 'acc'"):
        M.check_metric_names(["acc"], "classification")
