"""``idx:DIR``: MNIST / Fashion-MNIST style IDX files.

An IDX file is a 4-byte magic number, one big-endian uint32 size per dimension, then the
values in C order::

    magic = 0x00 0x00 <dtype code> <number of dimensions>   (0x08 = uint8)
    images: magic 0x00000803, sizes (N, H, W), N*H*W bytes
    labels: magic 0x00000801, sizes (N,),      N bytes

``DIR`` holds ``train-images-idx3-ubyte`` + ``train-labels-idx1-ubyte`` and, optionally,
``t10k-images-idx3-ubyte`` + ``t10k-labels-idx1-ubyte`` (each raw or gzipped ``.gz``).
Images load as float32 (N, 1, H, W) raw pixel values 0..255; normalisation happens later.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from zerotune.config import DataConfig
from zerotune.data.base import Source, Split
from zerotune.errors import ZerotuneError
from zerotune.spec import DataInfo

# IDX type code → big-endian numpy dtype
DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FILES = {"images": "images-idx3-ubyte", "labels": "labels-idx1-ubyte"}


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzipped) into a numpy array, checking its header.

    Args:
        path: the file.
        ndim: the number of dimensions the caller expects (3 for images, 1 for labels).

    Raises:
        ZerotuneError: unreadable gzip, bad magic number, wrong dimensions, or a size that
            does not match the file length. The message names the file and the field.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ZerotuneError(f"cannot read the file ({e})", path=path) from None
    if len(raw) < 4:
        raise ZerotuneError(
            f"header: file has {len(raw)} bytes, too short for the 4-byte magic number", path=path
        )
    zero, code, dims = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or code not in DTYPES or dims == 0:
        magic = int.from_bytes(raw[:4], "big")
        raise ZerotuneError(
            f"magic number 0x{magic:08x} is not an IDX header (expected 0x00000801 for labels "
            "or 0x00000803 for images)",
            path=path,
        )
    if ndim is not None and dims != ndim:
        raise ZerotuneError(
            f"magic number 0x{int.from_bytes(raw[:4], 'big'):08x}: {dims} dimensions, expected {ndim}",
            path=path,
        )
    header = 4 + 4 * dims
    if len(raw) < header:
        raise ZerotuneError(f"header: truncated, {len(raw)} bytes for {dims} dimension sizes", path=path)
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(DTYPES[code])
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow on absurd sizes
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ZerotuneError(
            f"dims {list(shape)}: {what}, the header needs {expected} bytes but the file has {len(raw)}",
            path=path,
        )
    try:
        return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    except ValueError:  # an empty array whose other sizes are beyond what numpy can index
        raise ZerotuneError(f"dims {list(shape)}: not a valid array shape", path=path) from None


def find_file(root: Path, prefix: str, kind: str) -> Path | None:
    """The ``{prefix}-{kind}`` file in ``root``: raw, ``.gz``, or with a dot before ``idx``."""
    stem = FILES[kind]
    for name in (f"{prefix}-{stem}", f"{prefix}-{stem.replace('-idx', '.idx')}"):
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_pair(images_path: Path, labels_path: Path) -> Split:
    images = read_idx(images_path, ndim=3)  # (N, H, W)
    labels = read_idx(labels_path, ndim=1)  # (N,)
    if len(images) != len(labels):
        raise ZerotuneError(
            f"dims: {len(images)} images but {labels_path.name} has {len(labels)} labels", path=images_path
        )
    if labels.dtype.kind == "f" or (len(labels) and labels.min() < 0):
        raise ZerotuneError("labels must be non-negative integers", path=labels_path)
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)  # (N, 1, H, W)
    y = torch.from_numpy(labels.astype(np.int64))  # (N,)
    return Split(x, y)


def load_idx(arg: str, cfg: DataConfig | None = None) -> Source:
    """``idx:DIR`` → Source with the train files and, when present, the t10k files as test."""
    root = Path(arg)
    if not root.is_dir():
        if root.exists():
            raise ZerotuneError("not a folder", path=root)
        raise ZerotuneError(f"IDX folder not found; fetch it with `zerotune data download mnist {root}` (or "
                            "fashion-mnist), or put the train-/t10k- IDX files there", path=root)
    found = {(p, k): find_file(root, p, k) for p in ("train", "t10k") for k in FILES}
    if found["train", "images"] is None or found["train", "labels"] is None:
        missing = [f"train-{FILES[k]}[.gz]" for k in FILES if found["train", k] is None]
        raise ZerotuneError(f"missing {' and '.join(missing)}", path=root)
    train = _load_pair(found["train", "images"], found["train", "labels"])
    test = None
    if found["t10k", "images"] is not None and found["t10k", "labels"] is not None:
        test = _load_pair(found["t10k", "images"], found["t10k", "labels"])
        if test.x.shape[1:] != train.x.shape[1:]:
            raise ZerotuneError(
                f"dims: test images are {list(test.x.shape[2:])}, train images {list(train.x.shape[2:])}",
                path=found["t10k", "images"],
            )
    top = int(train.y.max()) if len(train) else 0
    if test is not None and len(test):
        top = max(top, int(test.y.max()))
    classes = [str(c) for c in range(max(10, top + 1))]
    info = DataInfo("image", list(train.x.shape[1:]), classes=classes)
    return Source(train, info, test=test)
