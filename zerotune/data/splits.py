"""Splits: a config's data section → normalised train/val/test tensors.

A data spec is ``KIND:ARG``; ``SOURCES`` maps KIND to a loader ``(arg, DataConfig) -> Source``.
:func:`load_data` turns a config's ``data`` section into train/val/test splits:

1. ``data.train`` is loaded; a source with its own test split (IDX t10k, CIFAR test_batch)
   brings it along.
2. test: ``data.test`` if given, else the source's own test split, else a seeded, stratified
   ``data.test_split`` fraction of the train pool.
3. val: ``data.val`` if given, else a seeded, stratified ``data.val_split`` fraction of what is left.
4. Normalisation statistics (per channel for images, per feature otherwise) come from the train
   split only, are applied once to every split, and are saved with the model.

The same config and seed always rebuild exactly the same splits, which is how ``evaluate``
finds a run's held-out test examples again.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zerotune.data.base import Source, Split
from zerotune.data.lazy import LazyRows
from zerotune.data.sources import load_source
from zerotune.data.tokenizer import save_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.spec import DataInfo


@dataclass
class Preprocess:
    """Normalisation learnt on the train split: x' = (x - x_mean) / x_std, y' = (y - y_mean) / y_std."""

    x_mean: list[float] | None = None
    x_std: list[float] | None = None
    y_mean: float | None = None
    y_std: float | None = None
    channel_dim: int | None = None  # images: statistics per channel (dim 1), else per feature

    def _shape(self, x: torch.Tensor) -> list[int]:
        if self.channel_dim is not None:
            return [1, -1] + [1] * (x.ndim - 2)
        return [1] * (x.ndim - 1) + [-1]

    def x(self, x: torch.Tensor) -> torch.Tensor:
        if self.x_mean is None or not x.is_floating_point():
            return x
        if isinstance(x, LazyRows):  # normalised as each batch is read
            return x.map(self.x)
        shape = self._shape(x)
        mean = torch.tensor(self.x_mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.x_std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def y(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.y_mean is None else (y - self.y_mean) / self.y_std

    def y_inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.y_mean is None else y * self.y_std + self.y_mean

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict | None) -> Preprocess:
        return cls(**(d or {}))

    @classmethod
    def fit(cls, train: Split, info: DataInfo) -> Preprocess:
        pre = cls()
        x = train.x
        if isinstance(x, LazyRows) and len(x) > 1:  # read from disk: one pass over the rows
            pre.channel_dim = 1 if info.kind == "image" else None
            pre.x_mean, pre.x_std = x.stats(1 if info.kind == "image" else -1)
        elif x.is_floating_point() and len(x) > 1:
            if info.kind == "image":
                dims = [d for d in range(x.ndim) if d != 1]
                pre.channel_dim = 1
            else:
                dims = list(range(x.ndim - 1))
            pre.x_mean = x.double().mean(dims).flatten().tolist()
            pre.x_std = x.double().std(dims).clamp_min(1e-6).flatten().tolist()
        if info.target == "regression" and len(train) > 1:
            pre.y_mean = float(train.y.double().mean())
            pre.y_std = max(float(train.y.double().std()), 1e-6)
        return pre

    def apply(self, split: Split | None) -> Split | None:
        return None if split is None else Split(self.x(split.x), self.y(split.y))


@dataclass
class Data:
    """Ready-to-train splits (already normalised), their description and the normalisation."""

    train: Split
    val: Split | None
    test: Split | None
    info: DataInfo
    preprocess: Preprocess = field(default_factory=Preprocess)
    tokenizer: object | None = None


def split_off(split: Split, fraction: float, seed: int, stratify: bool) -> tuple[Split, Split | None]:
    """Split ``fraction`` of the examples off, seeded and (for classes) stratified. Returns (rest, part)."""
    n = len(split)
    n_part = int(round(n * fraction))
    if fraction <= 0 or n_part == 0:
        return split, None
    if n_part >= n:
        raise ZerotuneError(f"cannot split {fraction} of {n} examples off and keep any for training")
    from sklearn.model_selection import train_test_split

    index = np.arange(n)
    labels = split.y.numpy() if stratify else None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() < 2 or n_part < len(counts) or n - n_part < len(counts):
            labels = None  # too few examples per class to stratify
    rest, part = train_test_split(index, test_size=n_part, random_state=seed, stratify=labels)
    rest.sort()
    part.sort()
    return split.take(torch.from_numpy(rest)), split.take(torch.from_numpy(part))


def _check_compatible(main: Source, other: Source, spec: str) -> Split:
    if list(other.info.input_shape) != list(main.info.input_shape) and main.info.kind != "tokens":
        raise ZerotuneError(
            f"data spec {spec!r}: examples have shape {other.info.input_shape}, "
            f"but the train data has {main.info.input_shape}"
        )
    split = other.train
    if main.info.target == "classification" and other.info.classes != main.info.classes:
        # map the other source's labels onto the train label set by name
        names = {c: i for i, c in enumerate(main.info.classes)}
        unknown = [c for c in other.info.classes if c not in names]
        if unknown:
            raise ZerotuneError(f"data spec {spec!r}: labels {unknown[:5]} do not occur in the train data")
        remap = torch.tensor([names[c] for c in other.info.classes], dtype=torch.long)
        split = Split(split.x, remap[split.y])
    return split


def keep_classes(source: Source, names: list[str], spec: str) -> Source:
    """Keep only the examples labelled with one of ``names`` (``data.classes``); labels re-indexed in that order."""
    if source.info.target != "classification":
        raise ZerotuneError(f"data.classes: data spec {spec!r} has no class labels")
    unknown = [c for c in names if c not in source.info.classes]
    if unknown or len(set(names)) != len(names) or not names:
        problem = f"labels {unknown[:5]} do not occur" if unknown else "expected distinct labels"
        raise ZerotuneError(f"data.classes: {problem} in data spec {spec!r} (labels: {source.info.classes[:12]})")
    remap = torch.full((len(source.info.classes),), -1, dtype=torch.long)
    for new, name in enumerate(names):
        remap[source.info.classes.index(name)] = new

    def take(split: Split | None) -> Split | None:
        if split is None:
            return None
        kept = split.take(remap[split.y] >= 0)
        return Split(kept.x, remap[kept.y])

    info = DataInfo(**{**source.info.to_dict(), "classes": list(names)})
    return Source(take(source.train), info, take(source.test), source.tokenizer)


def load_data(cfg, task: str = "classification", seed: int = 0) -> Data:
    """Build normalised train/val/test splits from a ``DataConfig`` (see the module docstring).

    With ``data.classes`` set, every source keeps only the examples of those labels (step 0).
    """
    source = load_source(cfg.train, cfg)
    if cfg.classes:
        source = keep_classes(source, cfg.classes, cfg.train)
    info = source.info
    if task == "regression" and info.target == "classification":
        try:  # numeric labels read as classes (e.g. integers in a CSV) are the regression targets
            values = torch.tensor([float(c) for c in info.classes])
        except ValueError:
            raise ZerotuneError(f"data spec {cfg.train!r}: task is regression but the labels are not numbers") from None
        source.train.y = values[source.train.y]
        if source.test is not None:
            source.test.y = values[source.test.y]
        info.target, info.classes = "regression", []
    if task == "classification" and info.target == "regression":
        raise ZerotuneError(f"data spec {cfg.train!r}: task is classification but the targets are real numbers; "
                            "set task: regression")
    if info.target == "classification" and len(info.classes) < 2:
        raise ZerotuneError(f"data spec {cfg.train!r}: every example has the label {info.classes[:1]}; a classifier "
                            "needs two classes or more")
    stratify = info.target == "classification"
    pool = source.train
    with tempfile.TemporaryDirectory() as tmp:
        if source.tokenizer is not None and not cfg.tokenizer:
            # text: val/test files are encoded with the vocabulary built on the train file
            save_tokenizer(source.tokenizer, Path(tmp) / "tokenizer.json")
            cfg = cfg.model_copy(update={"tokenizer": str(Path(tmp) / "tokenizer.json")})
        return _splits(source, pool, cfg, seed, stratify)


def _splits(source: Source, pool: Split, cfg, seed: int, stratify: bool) -> Data:
    info = source.info

    def other(spec: str) -> Source:
        loaded = load_source(spec, cfg)
        return keep_classes(loaded, cfg.classes, spec) if cfg.classes else loaded

    if cfg.test:
        test = _check_compatible(source, other(cfg.test), cfg.test)
    elif source.test is not None:
        test = source.test
    else:
        pool, test = split_off(pool, cfg.test_split, seed, stratify)
    if cfg.val:
        val = _check_compatible(source, other(cfg.val), cfg.val)
    else:
        pool, val = split_off(pool, cfg.val_split, seed + 1, stratify)
    if len(pool) == 0:
        raise ZerotuneError(f"data spec {cfg.train!r}: no training examples")
    pre = Preprocess.fit(pool, info) if cfg.normalize else Preprocess()
    return Data(pre.apply(pool), pre.apply(val), pre.apply(test), info, pre, source.tokenizer)
