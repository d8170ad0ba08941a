"""The in-memory data containers every source returns.

A *source* (``builtin:digits``, ``idx:DIR``, ``csv:FILE`` ...) loads into a :class:`Source`:
a train :class:`Split`, optionally its own test split, and what the model needs to know
about the data (:class:`zerotune.spec.DataInfo`). Splitting, normalisation and batching happen later,
on tensors, never per sample in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from zerotune.spec import DataInfo


@dataclass
class Split:
    """One split: ``x`` (N, ...) features or token ids, ``y`` (N,) or (N, k), held as tensors.

    ``x`` may instead be a ``zerotune.data.lazy.LazyRows`` (image files or a memory-mapped array,
    read on demand), which indexes like the tensor it stands for.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def take(self, index: torch.Tensor) -> Split:
        """The examples at ``index`` (integer indices or a boolean mask); files stay on disk."""
        x = self.x.subset(index) if hasattr(self.x, "subset") else self.x[index]  # LazyRows: still unread
        return Split(x, self.y[index])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Source:
    """What a data spec loads: the train split, the source's own test split if it has one,
    and the data's description. ``tokenizer`` is set for text sources (a ``tokenizers.Tokenizer``)."""

    train: Split
    info: DataInfo
    test: Split | None = None
    tokenizer: object | None = None


def spec_path(spec: str | None) -> Path | None:
    """The file or folder a data spec reads: ``KIND:PATH``, a bare path (instruction files), or None for a
    builtin set."""
    if not spec:
        return None
    kind, sep, arg = spec.partition(":")
    if sep and kind == "builtin":
        return None
    return Path(arg if sep and kind.isidentifier() else spec)
