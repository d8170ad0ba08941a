"""Data sets that ship with installed packages, so every recipe runs offline.

    builtin:digits    scikit-learn's 1,797 8×8 grey-scale digits (10 classes), as (N, 1, 8, 8) images
    builtin:diabetes  scikit-learn's 442-patient regression set, 10 numeric features
"""

from __future__ import annotations

import numpy as np
import torch

from zerotune.data.base import DataInfo, Source, Split
from zerotune.errors import ZerotuneError


def digits() -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    return Source(Split(x, y), DataInfo("image", [1, 8, 8], classes=[str(c) for c in range(10)]))


def diabetes() -> Source:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x = torch.from_numpy(d.data.astype(np.float32))
    y = torch.from_numpy(d.target.astype(np.float32))
    return Source(Split(x, y), DataInfo("tabular", [x.shape[1]], target="regression"))


BUILTINS = {"digits": digits, "diabetes": diabetes}


def load_builtin(name: str, cfg=None) -> Source:
    if name not in BUILTINS:
        raise ZerotuneError(f"unknown builtin data set {name!r}; choose from {', '.join(BUILTINS)}")
    return BUILTINS[name]()
