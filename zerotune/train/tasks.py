"""What the loop trains on. A task turns an optimizer step number into a batch, a model
output into a summed loss, and a model into evaluation numbers. The loop knows nothing else.

Batches are a pure function of (seed, step): epoch e = step // steps_per_epoch uses the
permutation drawn from a generator seeded with (seed, e), and augmentation draws from a
generator seeded with (seed, step). Resuming at step s therefore continues with exactly the
batches an uninterrupted run would have seen, with no iterator state to save.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zerotune.data import Data
from zerotune.data.base import Split
from zerotune.errors import ZerotuneError
from zerotune.evaluate import metrics as M

EVAL_BATCH = 1024


class SupervisedTask:
    """Classification or regression on tensors held on the device, batched by index."""

    unit, units_per_example = "samples", 1

    def __init__(self, data: Data, *, batch_size: int, seed: int, loss: str, label_smoothing: float,
                 metrics: list[str], augment=None, device: torch.device | str = "cpu") -> None:
        self.data, self.info, self.device = data, data.info, torch.device(device)
        self.batch_size, self.seed = batch_size, seed
        default_loss = "cross_entropy" if self.info.target == "classification" else "mse"
        self.loss_name = default_loss if loss == "auto" else loss
        if self.info.target == "regression" and self.loss_name in ("cross_entropy", "bce"):
            raise ZerotuneError(f"train.loss: {self.loss_name} needs class labels, but the data is a regression set")
        if self.info.target == "classification" and self.loss_name == "mse":
            raise ZerotuneError("train.loss: mse needs numeric targets, but the data has class labels")
        self.label_smoothing = label_smoothing
        M.check_metric_names(metrics, self.info.target)
        self.metric_names = metrics
        self.augment = augment if augment is not None and augment.enabled else None
        if self.augment is not None and self.info.kind != "image":
            raise ZerotuneError("data.augment: augmentation is for image data")
        self.train = data.train.to(self.device)
        self.n = len(self.train)
        self.steps_per_epoch = math.ceil(self.n / batch_size)
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).to(self.device), epoch
        return self._perm

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole batch of optimizer step ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        index = self._permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        x, y = self.train.x[index], self.train.y[index]
        if self.augment is not None:
            from zerotune.data.augment import augment_batch

            x = augment_batch(x, self.augment, torch.Generator().manual_seed(self.seed * 7_919 + step))
        return x, y

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed (not averaged) loss of a micro-batch; the loop divides by the batch size."""
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(out.float(), y, reduction="sum", label_smoothing=self.label_smoothing)
        if self.loss_name == "bce":  # one-vs-rest over the classes
            target = F.one_hot(y, out.shape[-1]).float()
            return F.binary_cross_entropy_with_logits(out.float(), target, reduction="sum") / out.shape[-1]
        return F.mse_loss(out.float().reshape(y.shape), y.float(), reduction="sum")

    @property
    def has_val(self) -> bool:
        return self.data.val is not None and len(self.data.val) > 0

    def evaluate_val(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate(model, self.data.val)

    def extra_log(self, record: dict) -> dict:
        return {}

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        outs = [model(x[i : i + EVAL_BATCH].to(self.device)).float() for i in range(0, len(x), EVAL_BATCH)]
        return torch.cat(outs) if outs else torch.empty(0)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split, predict=None) -> dict[str, float]:
        """Mean loss and the configured metrics on ``split`` (regression metrics in the data's units).

        ``predict(model, x)`` replaces :meth:`predict` (several processes each run a slice).
        """
        was_training = model.training
        model.eval()
        out = (predict or self.predict)(model, split.x)
        y = split.y.to(out.device)
        result = {"loss": float(self.loss(out, y)) / max(1, len(y))}
        if self.info.target == "classification":
            result |= M.classification_metrics(out, y, self.metric_names)
        else:
            pre = self.data.preprocess
            result |= M.regression_metrics(pre.y_inverse(out.reshape(y.shape)), pre.y_inverse(y), self.metric_names)
        model.train(was_training)
        return result
