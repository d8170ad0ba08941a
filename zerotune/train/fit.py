"""Keras-style ``fit`` / ``evaluate_model`` for a model built in Python, on in-memory arrays.

``fit(model, train=(x, y), val=(x_val, y_val), optimizer="adam", epochs=5)`` is the Keras
``compile`` + ``fit`` pair in one call. It does not train by itself: it turns its arguments
into a :class:`~zerotune.config.Config` and a :class:`~zerotune.train.tasks.SupervisedTask`
over the arrays and runs the one training loop, :func:`zerotune.train.loop.train_loop`, so
batching, the loss, gradient checks, early stopping and checkpoints are those of
``zerotune train``.

Like Keras, the arrays are used as given (no normalisation). Integer ``y`` means
classification (labels are class ids 0…K-1, the model outputs K logits); floating ``y``
means regression. Each epoch visits every training example once in a seeded random order
(the permutation for epoch e is ``torch.randperm(N)`` from a generator seeded with
``seed · 1000003 + e``), in batches of ``batch_size`` (the last one may be smaller).

``History.history`` holds one value per epoch, as in Keras: ``loss`` is the mean of the
epoch's batch losses, ``val_loss`` and ``val_<metric>`` are computed on the whole validation
set with the weights at the end of the epoch (in eval mode). Metrics on the training set are
not computed during training; call :func:`evaluate_model` for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from zerotune.config import Config, EarlyStopping, describe_error
from zerotune.data.base import Split
from zerotune.data.splits import Data, Preprocess
from zerotune.errors import ZerotuneError
from zerotune.files import save_weights, write_json, write_text
from zerotune.run import create_run
from zerotune.spec import DataInfo
from zerotune.train.loop import pick_device, seed_everything, train_loop
from zerotune.train.tasks import SupervisedTask

# Keras spellings accepted next to zerotune's own names
LOSS_ALIASES = {
    "sparse_categorical_crossentropy": "cross_entropy",
    "mean_squared_error": "mse",
}
# metrics for which larger is better (early stopping infers the mode from the name)
HIGHER_IS_BETTER = ("accuracy", "precision", "recall", "f1", "auroc", "r2")
# config keys → the fit() argument a user would have to change
ARGUMENTS = {
    "optim.name": "optimizer",
    "optim.lr": "lr",
    "optim.weight_decay": "weight_decay",
    "train.loss": "loss",
    "train.epochs": "epochs",
    "train.batch_size": "batch_size",
    "train.metrics": "metrics",
    "train.device": "device",
    "train.early_stopping": "early_stopping",
}


@dataclass
class History:
    """What ``fit`` returns, shaped like Keras' ``History``.

    Attributes:
        history: one list per quantity, one value per epoch: ``loss``, ``lr``,
            ``samples_per_sec`` and, with validation data, ``val_loss`` and ``val_<metric>``.
        epoch: the epochs trained, 0-based (shorter than ``params["epochs"]`` after early stopping).
        params: the arguments that shaped training (epochs, batch_size, steps per epoch, ...).
        run: the run folder when ``out`` was given, else None.
        stopped_early: whether early stopping ended training.
        best_epoch: the 0-based epoch with the best monitored value (None without validation).
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    run: Path | None = None
    stopped_early: bool = False
    best_epoch: int | None = None

    def add(self, record: dict[str, Any]) -> None:
        epoch = round(record["epoch"]) - 1
        if not self.epoch or self.epoch[-1] != epoch:
            self.epoch.append(epoch)
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.history.setdefault(key, []).append(float(value))


# ---------------------------------------------------------------- arrays → tensors


def _tensor(a: Any, name: str, who: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    if isinstance(a, (list, tuple)):
        a = np.asarray(a)
    if not isinstance(a, np.ndarray):
        raise ZerotuneError(f"{who}: {name}: expected a numpy array or a torch tensor, got {type(a).__name__}")
    if a.dtype.kind not in "biuf":
        raise ZerotuneError(f"{who}: {name}: expected numbers, got an array of dtype {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a))


def _pair(pair: Any, name: str, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ZerotuneError(f"{who}: {name}: expected a pair (x, y) of arrays")
    x, y = _tensor(pair[0], f"{name} x", who), _tensor(pair[1], f"{name} y", who)
    if x.ndim == 0 or len(x) == 0:
        raise ZerotuneError(f"{who}: {name}: x holds no examples (shape {tuple(x.shape)})")
    if y.ndim == 0 or len(y) != len(x):
        raise ZerotuneError(f"{who}: {name}: x has {len(x)} rows but y has shape {tuple(y.shape)}")
    # uint8 pixels and bools become float inputs as in Keras; wider integers stay token ids
    x = x.long() if x.dtype in (torch.int16, torch.int32, torch.int64) else x.float()
    if y.dtype == torch.bool or not y.is_floating_point():
        y = y.long()
        if y.ndim != 1:
            raise ZerotuneError(f"{who}: {name}: integer y must hold one class id per row, "
                                f"got shape {tuple(y.shape)}")
        if int(y.min()) < 0:
            raise ZerotuneError(f"{who}: {name}: class ids must be ≥ 0, found {int(y.min())}")
    else:
        y = y.float()
    return x, y


def _data(train: Any, val: Any, who: str = "fit", name: str = "train") -> Data:
    x, y = _pair(train, name, who)
    val_split = None
    if val is not None:
        xv, yv = _pair(val, "val", who)
        if xv.shape[1:] != x.shape[1:]:
            raise ZerotuneError(f"fit: val: examples have shape {list(xv.shape[1:])}, "
                                f"but the train examples have {list(x.shape[1:])}")
        if yv.is_floating_point() != y.is_floating_point():
            raise ZerotuneError(f"fit: val: y is {yv.dtype} but the train y is {y.dtype}")
        val_split = Split(xv, yv)
    classification = not y.is_floating_point()
    kind = "tokens" if not x.is_floating_point() else {1: "tabular", 2: "sequence"}.get(x.ndim - 1, "image")
    if classification:
        k = int(max(y.max(), val_split.y.max() if val_split is not None else 0)) + 1
        info = DataInfo(kind, list(x.shape[1:]), "classification", [str(c) for c in range(k)])
    else:
        info = DataInfo(kind, list(x.shape[1:]), "regression")
    return Data(Split(x, y), val_split, None, info, Preprocess())


def _check_model(model: nn.Module, data: Data, device: torch.device, who: str) -> None:
    """One example through the model (eval mode, no grad) to turn shape mistakes into one clear line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(data.train.x[:1].to(device))
    except RuntimeError as e:
        raise ZerotuneError(f"{who}: the model does not accept x of shape {list(data.train.x.shape)}: "
                            f"{str(e).splitlines()[0]}") from None
    finally:
        model.train(was_training)
    if data.info.target == "classification" and out.shape[-1] < data.info.n_outputs:
        raise ZerotuneError(f"{who}: y holds class ids up to {data.info.n_outputs - 1}, "
                            f"but the model outputs only {out.shape[-1]} values per example")


def _early_stopping(value: Any) -> EarlyStopping | None:
    if value is None or isinstance(value, EarlyStopping):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, dict)):
        raise ZerotuneError("fit: early_stopping: expected a patience (int), a mapping of "
                            f"EarlyStopping keys or an EarlyStopping, got {value!r}")
    raw = {"patience": value} if isinstance(value, int) else dict(value)
    metric = raw.setdefault("metric", "val_loss")
    if "mode" not in raw:  # like Keras' mode="auto"
        raw["mode"] = "max" if isinstance(metric, str) and metric.endswith(HIGHER_IS_BETTER) else "min"
    try:
        return EarlyStopping.model_validate(raw)
    except ValidationError as e:
        raise ZerotuneError(f"fit: early_stopping: {describe_error(e.errors()[0])}") from None


def _config(*, target: str, optimizer: str, lr: float, loss: str, metrics: Sequence[str], epochs: int,
            batch_size: int, seed: int, device: str, early_stopping: EarlyStopping | None,
            weight_decay: float, steps_per_epoch: int, progress: bool, who: str = "fit") -> Config:
    raw = {
        "seed": seed,
        "task": target,
        "optim": {"name": optimizer.lower() if isinstance(optimizer, str) else optimizer, "lr": lr,
                  "weight_decay": weight_decay},
        "train": {"epochs": epochs, "batch_size": batch_size,
                  "loss": LOSS_ALIASES.get(loss, loss) if isinstance(loss, str) else loss,
                  "metrics": list(metrics) if isinstance(metrics, (list, tuple)) else metrics,
                  "eval_every": 0, "log_every": steps_per_epoch, "checkpoint_every": 0,
                  "early_stopping": early_stopping, "device": device, "progress": progress},
    }
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ZerotuneError(f"{who}: {_argument_names(describe_error(e.errors()[0]))}") from None


def _argument_names(message: str) -> str:
    """``train.epochs: ...`` → ``epochs: ...``: name the argument, not the config key behind it."""
    for key, argument in ARGUMENTS.items():
        if message.startswith(key):
            return argument + message[len(key):]
    return message


def _task(data: Data, cfg: Config, device: torch.device, who: str):
    try:
        return SupervisedTask(data, batch_size=cfg.train.batch_size, seed=cfg.seed, loss=cfg.train.loss,
                              label_smoothing=0.0, metrics=cfg.train.metrics, device=device)
    except ZerotuneError as e:
        raise ZerotuneError(f"{who}: {_argument_names(str(e))}") from None


# ---------------------------------------------------------------- the API


def fit(model: nn.Module, train: tuple[Any, Any], val: tuple[Any, Any] | None = None, *,
        optimizer: str = "adam", lr: float = 1e-3, loss: str = "cross_entropy",
        metrics: Sequence[str] = ("accuracy",), epochs: int = 5, batch_size: int = 32, seed: int = 0,
        device: str = "auto", early_stopping: int | dict | EarlyStopping | None = None,
        weight_decay: float = 0.0, out: str | Path | None = None, overwrite: bool = False,
        verbose: bool | int = True) -> History:
    """Train ``model`` in place on arrays, like Keras ``model.compile(...); model.fit(...)``.

    Args:
        model: any ``nn.Module`` mapping a batch of x to logits (classification) or values.
        train: ``(x, y)`` numpy arrays or tensors; integer y → classification.
        val: optional ``(x_val, y_val)``, evaluated at the end of each epoch.
        optimizer: ``sgd``, ``adam``, ``adamw`` or ``rmsprop``.
        lr: learning rate.
        loss: ``cross_entropy`` (alias ``sparse_categorical_crossentropy``), ``mse``
            (``mean_squared_error``), ``bce`` (one-vs-rest over classes) or ``auto``.
        metrics: validation metrics, e.g. ``["accuracy", "f1"]`` or ``["mae", "r2"]``.
        epochs: passes over the training data.
        batch_size: examples per optimizer step.
        seed: seeds the batch order and the global RNGs (dropout), so a call is repeatable.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``; the model is moved there.
        early_stopping: a patience (monitors ``val_loss``), a mapping of
            :class:`~zerotune.config.EarlyStopping` keys (``metric``, ``mode``, ``patience``,
            ``min_delta``, ``restore_best``) or an ``EarlyStopping``; needs ``val``.
        weight_decay: decoupled for ``adamw``, L2 for the others; matrices only.
        out: a run folder for checkpoints, ``metrics.jsonl``, TensorBoard events,
            ``model.safetensors`` and ``history.json``; None keeps everything in memory.
        overwrite: replace an existing non-empty ``out``.
        verbose: 0/False silent, 1/True a progress bar and one line per epoch, 2 one line per epoch.

    Returns:
        A :class:`History`; ``history.history["val_accuracy"][-1]`` is the last epoch's value.

    Raises:
        ZerotuneError: a bad argument, array or model/data mismatch (the message names it).
        RunFailed: the loss or gradient became non-finite.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> history = fit(model, (x, y), val=(x_val, y_val), epochs=5, batch_size=32)
        >>> history.history["val_accuracy"]
    """
    data = _data(train, val)
    verbose = int(verbose)
    early = _early_stopping(early_stopping)
    if early is not None and data.val is None:
        raise ZerotuneError("fit: early_stopping needs validation data: pass val=(x_val, y_val)")
    steps_per_epoch = -(-len(data.train) // batch_size) if isinstance(batch_size, int) and batch_size > 0 else 1
    cfg = _config(target=data.info.target, optimizer=optimizer, lr=lr, loss=loss, metrics=metrics, epochs=epochs,
                  batch_size=batch_size, seed=seed, device=device, early_stopping=early, weight_decay=weight_decay,
                  steps_per_epoch=steps_per_epoch, progress=verbose == 1)
    dev = pick_device(cfg.train.device)
    model.to(dev)
    _check_model(model, data, dev, "fit")
    task = _task(data, cfg, dev, "fit")
    run = None
    if out is not None:
        run = create_run(out, overwrite)
        write_text(run.config, f"# zerotune.fit: {type(model).__name__} on in-memory arrays "
                                      f"({len(data.train)} train, {len(data.val) if data.val else 0} val)\n"
                          + cfg.to_yaml())

    history = History(params={"epochs": epochs, "batch_size": batch_size, "steps": steps_per_epoch,
                              "samples": len(data.train), "optimizer": cfg.optim.name, "lr": lr,
                              "loss": task.loss_name, "metrics": list(cfg.train.metrics), "device": str(dev)},
                      run=run.root if run is not None else None)

    def on_record(record: dict[str, Any]) -> None:
        history.add(record)
        if verbose:
            from tqdm import tqdm

            values = " - ".join(f"{k}: {v:.4g}" for k, v in record.items()
                                if k not in ("step", "epoch", "lr") and isinstance(v, (int, float)))
            tqdm.write(f"Epoch {round(record['epoch'])}/{epochs} - {values}")

    was_training = model.training
    seed_everything(cfg.seed)
    state = train_loop(model, task, cfg, checkpoints=run.checkpoints if run else None,
                       metrics_path=run.metrics if run else None, device=dev, log=print if verbose else _quiet,
                       on_record=on_record)
    model.train(was_training)
    history.stopped_early = state.stopped_early
    if state.best_step is not None:
        history.best_epoch = -(-state.best_step // steps_per_epoch) - 1
    if run is not None:
        save_weights(run.weights, model.state_dict(), metadata={"format": "pt"})
        write_json(run.root / "history.json",
                   {"history": history.history, "epoch": history.epoch, "params": history.params})
    return history


def _quiet(*args: Any) -> None:
    pass


def evaluate_model(model: nn.Module, x: Any, y: Any, *, metrics: Sequence[str] = ("accuracy",),
                   loss: str = "cross_entropy", device: str = "auto") -> dict[str, float]:
    """Mean loss and ``metrics`` of ``model`` on ``(x, y)``, like Keras ``model.evaluate``.

    Args:
        model: the model (evaluated in eval mode; its mode is restored afterwards).
        x: inputs, a numpy array or tensor.
        y: integer class ids (classification) or floating targets (regression).
        metrics: metric names, as for :func:`fit`.
        loss: as for :func:`fit`.
        device: where to evaluate; ``auto`` keeps the model where its parameters are.

    Returns:
        ``{"loss": ..., "accuracy": ..., ...}``.

    Example:
        >>> evaluate_model(model, x_test, y_test, metrics=["accuracy", "f1"])
        {'loss': 0.21, 'accuracy': 0.94, 'f1': 0.93}
    """
    who = "evaluate_model"
    data = _data((x, y), None, who, "x, y")
    params = next(iter(model.parameters()), None)
    dev = (params.device if params is not None else torch.device("cpu")) if device == "auto" else pick_device(device)
    model.to(dev)
    _check_model(model, data, dev, who)
    cfg = _config(target=data.info.target, optimizer="adam", lr=1e-3, loss=loss, metrics=metrics, epochs=1,
                  batch_size=1, seed=0, device="cpu", early_stopping=None, weight_decay=0.0, steps_per_epoch=1,
                  progress=False, who=who)
    return _task(data, cfg, dev, who).evaluate(model, data.train)


__all__ = ["fit", "evaluate_model", "History"]
