"""Metrics through torchmetrics' functional API (not hand-rolled).

Classification (from logits (N, K) and labels (N,)):
    accuracy       fraction of argmax predictions equal to the label
    precision      macro average over classes of TP / (TP + FP)
    recall         macro average of TP / (TP + FN)
    f1             macro average of 2·P·R / (P + R)
    topK_accuracy  label among the K largest logits (e.g. top5_accuracy)
    auroc          macro one-vs-rest area under the ROC curve
Regression (from predictions and targets in the data's own units): mse, mae, r2.

torchmetrics is imported on first use: it takes seconds to import, and most commands never
compute a metric.
"""

from __future__ import annotations

import re

import torch

from zerotune.errors import ZerotuneError

CLASSIFICATION = ("accuracy", "precision", "recall", "f1", "auroc", "top5_accuracy")
REGRESSION = ("mse", "mae", "r2")
_TOPK = re.compile(r"^top([1-9]\d{0,5})_accuracy$")


def check_metric_names(names: list[str], target: str) -> None:
    allowed = CLASSIFICATION if target == "classification" else REGRESSION
    for name in names:
        if name not in allowed and not (target == "classification" and _TOPK.match(name)):
            choices = ", ".join(allowed)
            raise ZerotuneError(f"train.metrics: unknown metric {name!r} for {target}; choose from {choices}")


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict[str, float]:
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    k = logits.shape[-1]
    logits, y = logits.float().cpu(), y.cpu()
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            v = multiclass_accuracy(logits, y, num_classes=k, average="micro")
        elif name == "precision":
            v = multiclass_precision(logits, y, num_classes=k, average="macro")
        elif name == "recall":
            v = multiclass_recall(logits, y, num_classes=k, average="macro")
        elif name == "f1":
            v = multiclass_f1_score(logits, y, num_classes=k, average="macro")
        elif name == "auroc":
            v = multiclass_auroc(logits.softmax(-1), y, num_classes=k, average="macro")
        else:
            top = int(_TOPK.match(name).group(1))
            v = multiclass_accuracy(logits, y, num_classes=k, top_k=min(top, k), average="micro")
        out[name] = float(v)
    return out


def per_class(logits: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict[str, dict[str, float]]:
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision, multiclass_recall

    k = logits.shape[-1]
    logits, y = logits.float().cpu(), y.cpu()
    p = multiclass_precision(logits, y, num_classes=k, average=None)
    r = multiclass_recall(logits, y, num_classes=k, average=None)
    f = multiclass_f1_score(logits, y, num_classes=k, average=None)
    support = torch.bincount(y, minlength=k)
    return {
        c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i, c in enumerate(classes)
    }


def confusion_matrix(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K, K) counts; row = true class, column = predicted class."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(logits.float().cpu(), y.cpu(), num_classes=logits.shape[-1])


def regression_metrics(pred: torch.Tensor, y: torch.Tensor, names: list[str]) -> dict[str, float]:
    from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score

    pred, y = pred.float().cpu().reshape(y.shape), y.float().cpu()
    fns = {"mse": mean_squared_error, "mae": mean_absolute_error, "r2": r2_score}
    return {name: float(fns[name](pred, y)) for name in names}
