"""``cifar:DIR``: CIFAR-10 "python version" batches.

``DIR`` (or ``DIR/cifar-10-batches-py``) holds ``data_batch_1`` .. ``data_batch_5``,
``test_batch`` and ``batches.meta``. Each batch is a pickled dict with ``data``, a uint8
array (N, 3072) holding the red, green and blue 32×32 planes of each image in turn, and
``labels``, a list of N class ids; ``batches.meta`` names the classes (``label_names``).

A pickle can run arbitrary code when loaded, so batches are read with an unpickler that
only resolves the few numpy names an array needs and refuses every other global.
Images load as float32 (N, 3, 32, 32) raw pixel values 0..255.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np
import torch

from zerotune.config import DataConfig
from zerotune.data.base import Source, Split
from zerotune.errors import ZerotuneError
from zerotune.spec import DataInfo

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it to store bytes, refusing any codec but latin1."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}: only latin1 byte strings are expected")
    return codecs.encode(text, "latin1")


# The only globals a pickled numpy array (protocols 0-5, numpy 1.x or 2.x) refers to.
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,  # how protocol 2 stores bytes
}

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dicts, lists and scalars, and nothing else."""

    def __init__(self, file, path: Path) -> None:
        # latin1 is how Python 2 pickles of numpy arrays (the official CIFAR files) decode.
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        found = SAFE_GLOBALS.get((module, name))
        if found is None:
            raise ZerotuneError(
                f"refusing to load {module}.{name}: a CIFAR batch may only hold numpy arrays and lists",
                path=self.path,
            )
        return found


def load_pickle(path: Path) -> object:
    """Unpickle ``path`` with :class:`NumpyUnpickler`; a malformed pickle is a ZerotuneError."""
    try:
        with open(path, "rb") as f:
            return NumpyUnpickler(f, path).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        LookupError,  # IndexError, KeyError, an unknown codec
        MemoryError,  # a corrupt length field asks for more bytes than there are
        OverflowError,
    ) as e:
        raise ZerotuneError(f"not a readable CIFAR pickle ({type(e).__name__}: {e})", path=path) from None
    except OSError as e:
        raise ZerotuneError(f"cannot read the file ({e})", path=path) from None


def _text(key: object) -> object:
    return key.decode("latin1") if isinstance(key, bytes) else key


def read_batch(path: Path) -> Split:
    """One CIFAR batch file → Split of float32 (N, 3, 32, 32) images and int64 labels."""
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise ZerotuneError(f"expected a pickled dict, got {type(obj).__name__}", path=path)
    batch = {_text(k): v for k, v in obj.items()}
    if "data" not in batch:
        raise ZerotuneError(f"data: key missing, found {sorted(map(str, batch))}", path=path)
    label_key = "labels" if "labels" in batch else "fine_labels" if "fine_labels" in batch else None
    if label_key is None:
        raise ZerotuneError(f"labels: key missing, found {sorted(map(str, batch))}", path=path)
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = list(data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise ZerotuneError(f"data: expected a (N, 3072) array, got {shape}", path=path)
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError):
        raise ZerotuneError(f"{label_key}: expected a list of integers", path=path) from None
    if labels.shape != (len(data),):
        raise ZerotuneError(f"{label_key}: {labels.size} labels for {len(data)} images", path=path)
    if len(labels) and labels.min() < 0:
        raise ZerotuneError(f"{label_key}: labels must be non-negative", path=path)
    x = torch.from_numpy(data.astype(np.float32).reshape(-1, 3, 32, 32))  # (N, 3, 32, 32)
    return Split(x, torch.from_numpy(labels))


def _label_names(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    meta = load_pickle(path)
    if not isinstance(meta, dict):
        raise ZerotuneError(f"expected a pickled dict, got {type(meta).__name__}", path=path)
    meta = {_text(k): v for k, v in meta.items()}
    names = meta.get("label_names", meta.get("fine_label_names"))
    if not isinstance(names, list):
        raise ZerotuneError("label_names: expected a list of class names", path=path)
    return [str(_text(n)) for n in names]


def load_cifar(arg: str, cfg: DataConfig | None = None) -> Source:
    """``cifar:DIR`` → Source with the data batches as train and ``test_batch`` as test."""
    root = Path(arg)
    if not root.is_dir():
        if root.exists():
            raise ZerotuneError("not a folder", path=root)
        raise ZerotuneError(f"CIFAR folder not found; fetch it with `zerotune data download cifar10 {root}`, or "
                            "put the python batches (data_batch_1..5, test_batch) there", path=root)
    if not (root / TRAIN_BATCHES[0]).is_file() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    present = [root / name for name in TRAIN_BATCHES if (root / name).is_file()]
    if not present:
        raise ZerotuneError("no data_batch_1 .. data_batch_5 files (CIFAR-10 python version)", path=root)
    parts = [read_batch(p) for p in present]
    train = Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    test = read_batch(root / "test_batch") if (root / "test_batch").is_file() else None
    top = max(int(s.y.max()) for s in [train, test] if s is not None and len(s))
    names = _label_names(root / "batches.meta")
    if names is None:
        names = [str(c) for c in range(max(10, top + 1))]
    elif top >= len(names):
        raise ZerotuneError(
            f"label_names: {len(names)} names but a label is {top}", path=root / "batches.meta"
        )
    return Source(train, DataInfo("image", [3, 32, 32], classes=names), test=test)
