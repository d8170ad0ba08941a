"""Data specs → sources: ``KIND:ARG`` names where examples come from.

``SOURCES`` maps KIND to a loader ``(arg, DataConfig) -> Source``:

    builtin:NAME      scikit-learn's digits or diabetes, pydoc topics, standard-library docstrings
    arrays:FILE.npz   arrays x (N, ...) and y (N,); arrays:DIR holds x.npy (memory-mapped) and y.npy
    idx:DIR           MNIST-format IDX files (train + t10k)
    cifar:DIR         CIFAR-10 python batches (data_batch_* + test_batch)
    csv:FILE          a table (a text column makes it a text set)
    jsonl:FILE        one JSON object per line, like csv
    images:DIR        one folder of images per class
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from zerotune.data.base import Source, Split
from zerotune.data.builtin import load_builtin
from zerotune.data.cifar import load_cifar
from zerotune.data.idx import load_idx
from zerotune.data.images import load_images
from zerotune.data.lazy import LazyRows, keep_in_memory
from zerotune.data.tabular import load_csv, load_jsonl
from zerotune.errors import ZerotuneError
from zerotune.spec import DataInfo


def load_arrays(arg: str, cfg=None) -> Source:
    """``arrays:FILE.npz`` with arrays ``x`` (N, ...) and ``y`` (N,), or ``arrays:DIR`` with
    ``x.npy`` and ``y.npy``. Integer y → classification.

    A folder's ``x.npy`` is memory-mapped; where it would not fit in memory as float32
    (``data.in_memory``), x stays a :class:`MappedArray` whose rows are read per batch.
    """
    path = Path(arg)
    if path.is_dir():
        x, y = _read_npy_folder(path)
    elif not path.is_file():
        raise ZerotuneError("file not found", path=path)
    else:
        x, y = _read_npz(path)
    if x.dtype.kind not in "fiub" or y.dtype.kind not in "fiub":
        raise ZerotuneError("x and y must be numeric arrays", path=path)
    kind = {1: "tabular", 2: "sequence", 3: "image"}.get(x.ndim - 1)  # (N, F), (N, T, F), (N, C, H, W)
    if kind is None:
        raise ZerotuneError(f"x must have 2 to 4 dimensions, got shape {tuple(x.shape)}", path=path)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ZerotuneError(f"y must hold one label or target per row, shape (N,), got {tuple(y.shape)}", path=path)
    if len(x) != len(y):
        raise ZerotuneError(f"x has {len(x)} rows but y has {len(y)}", path=path)
    example = list(x.shape[1:])
    if not all(example):
        raise ZerotuneError(f"x has no features: each row has shape {tuple(example)}", path=path)
    _check_finite(y, "y", path)
    _check_finite(x, "x", path)  # a mapped x.npy too: one pass in chunks, before any training
    if isinstance(x, np.memmap) and not keep_in_memory(cfg.in_memory if cfg is not None else "auto",
                                                        x.size * 4):
        xt = MappedArray(path / "x.npy", example, range(len(x)))
    else:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(len(x), *example)
    if y.dtype.kind in "iub":
        labels, yi = np.unique(y, return_inverse=True)
        info = DataInfo(kind, example, classes=[str(v) for v in labels])
        return Source(Split(xt, torch.from_numpy(yi.reshape(-1).astype(np.int64))), info)
    info = DataInfo(kind, example, target="regression")
    return Source(Split(xt, torch.from_numpy(y.astype(np.float32))), info)


def _check_finite(a: np.ndarray, name: str, path: Path, chunk_bytes: int = 64 * 2**20) -> None:
    """NaN, an infinity, or a value beyond float32 (it would become one) in a float array is one
    line naming the array and the first bad row. Read in chunks of rows, so a memory-mapped array
    larger than memory is scanned without being loaded."""
    if a.dtype.kind != "f" or len(a) == 0:
        return
    limit = np.finfo(np.float32).max
    step = max(1, chunk_bytes // max(1, a[:1].nbytes))
    for start in range(0, len(a), step):
        chunk = np.asarray(a[start : start + step]).reshape(min(step, len(a) - start), -1)
        bad = ~(np.abs(chunk) <= limit)  # NaN compares False
        if bad.any():
            row = start + int(np.argwhere(bad)[0][0])
            raise ZerotuneError(f"{name} holds NaN, an infinity or a value beyond float32 (first in row {row})",
                                path=path)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise ZerotuneError(f"expected arrays 'x' and 'y', found {sorted(f.files)}", path=path)
            return f["x"], f["y"]
    # zipfile raises NotImplementedError for an unknown zip version or compression, RuntimeError for encryption
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:
        raise ZerotuneError(f"not a readable .npz file ({e})", path=path) from None


def _read_npy_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """x.npy memory-mapped (only its header is read here), y.npy in memory."""
    arrays = []
    for name, mmap in (("x.npy", "r"), ("y.npy", None)):
        path = folder / name
        if not path.is_file():
            raise ZerotuneError(f"expected {name} in the folder (arrays:DIR holds x.npy and y.npy)", path=folder)
        try:
            arrays.append(np.load(path, mmap_mode=mmap, allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:
            raise ZerotuneError(f"not a readable .npy file ({e})", path=path) from None
    return arrays[0], arrays[1]


class MappedArray(LazyRows):
    """Rows of a memory-mapped ``x.npy`` read on demand, as float32 (n, *example_shape)."""

    def __init__(self, path: Path, example_shape: list[int], rows: Sequence[int], transforms: tuple = (),
                 device: torch.device | str = "cpu") -> None:
        super().__init__(rows, example_shape, transforms, device)
        self.path, self._array = path, None

    def view(self, rows: list[int], transforms: tuple, device: torch.device) -> MappedArray:
        return MappedArray(self.path, list(self.example_shape), rows, transforms, device)

    def read(self, rows: list[int]) -> torch.Tensor:
        if self._array is None:  # opened in each process that reads (DataLoader workers too)
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        x = np.ascontiguousarray(self._array[rows], dtype=np.float32)
        return torch.from_numpy(x).reshape(len(rows), *self.example_shape)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}  # a worker maps the file itself


SOURCES = {
    "builtin": load_builtin,
    "arrays": load_arrays,
    "idx": load_idx,
    "cifar": load_cifar,
    "csv": load_csv,
    "jsonl": load_jsonl,
    "images": load_images,
}


def load_source(spec: str, cfg=None) -> Source:
    """Load one data spec (``KIND:ARG``)."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in SOURCES:
        raise ZerotuneError(f"data spec {spec!r}: expected KIND:ARG with KIND one of {', '.join(SOURCES)}")
    return SOURCES[kind](arg, cfg)
