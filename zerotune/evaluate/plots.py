"""Plots of a run, written as PNG files under ``RUN/plots/`` (atomically, like every file).

    loss.png                train and validation loss, the first validation metric, the learning rate
    confusion_matrix.png    true class × predicted class counts (zerotune evaluate, classifiers)

matplotlib is imported on first use, with the Agg backend: no screen is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zerotune.files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path`` (its folder is made), then closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    finally:
        _pyplot().close(fig)


def plot_training(rows: list[dict], path: Path) -> None:
    """Curves from ``metrics.jsonl`` records: loss (train and val), a validation metric, the learning rate."""
    plt = _pyplot()
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    metric = next((k for r in val for k in r if k.startswith("val_") and k != "val_loss"), None)
    fig, axes = plt.subplots(1, 3 if metric else 2, figsize=(13 if metric else 9, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    if metric:
        axes[1].plot([r["step"] for r in val if metric in r], [r[metric] for r in val if metric in r], "o-")
        axes[1].set(title=metric, xlabel="step")
    axes[-1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[-1].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion_matrix(cm: torch.Tensor, classes: list[str], path: Path) -> None:
    plt = _pyplot()
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * k, 1 + 0.45 * k))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="confusion matrix")
    if k <= 20:
        top = cm.max().item() or 1
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    save_figure(fig, path)
