"""Data sets that ship with installed packages, so every recipe runs offline.

    builtin:digits    scikit-learn's 1,797 8×8 grey-scale digits (10 classes), as (N, 1, 8, 8) images
    builtin:diabetes  scikit-learn's 442-patient regression set, 10 numeric features
    builtin:docstrings  text classification from this Python's standard library: the first paragraph
                      of each docstring of the public functions, classes and methods of 20 modules,
                      labelled by topic (files, math, text, time; see DOCSTRING_TOPICS); about 770
                      examples, tokenised like a text CSV (``data.tokenizer``, ``data.max_length``)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zerotune.config import DataConfig
from zerotune.data.base import Source, Split
from zerotune.data.tabular import table_source
from zerotune.errors import ZerotuneError
from zerotune.spec import DataInfo


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


DOCSTRING_TOPICS = {
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile"],
    "math": ["math", "cmath", "statistics", "fractions", "decimal"],
    "text": ["re", "string", "textwrap", "difflib", "unicodedata"],
    "time": ["datetime", "time", "calendar", "zoneinfo"],
}


def docstring_texts() -> list[tuple[str, str]]:
    """(first docstring paragraph, topic) pairs, sorted; a paragraph found under two topics is dropped."""
    import importlib
    import inspect

    seen: dict[str, set[str]] = {}
    for topic, modules in DOCSTRING_TOPICS.items():
        for module_name in modules:
            module = importlib.import_module(module_name)
            home = module_name.split(".")[0]
            for name in sorted(dir(module)):
                if name.startswith("_"):
                    continue
                obj = getattr(module, name)
                objs = [obj]
                if inspect.isclass(obj) and getattr(obj, "__module__", "").split(".")[0].lstrip("_") == home:
                    objs += [getattr(obj, a) for a in sorted(vars(obj)) if not a.startswith("_")]
                for o in objs:
                    doc = inspect.getdoc(o) if callable(o) else None
                    if doc:
                        text = " ".join(doc.strip().split("\n\n")[0].split())
                        if len(text) >= 20:
                            seen.setdefault(text, set()).add(topic)
    return sorted((text, next(iter(t))) for text, t in seen.items() if len(t) == 1)


def docstrings(cfg: DataConfig | None = None) -> Source:
    cfg = cfg or DataConfig()
    rows = [[text, topic] for text, topic in docstring_texts()]
    header = [cfg.text_column, cfg.label_column]
    return table_source(header, rows, list(range(1, len(rows) + 1)), Path("builtin:docstrings"), cfg)


BUILTINS = {"digits": digits, "diabetes": diabetes, "docstrings": docstrings}


def load_builtin(name: str, cfg: DataConfig | None = None) -> Source:
    if name not in BUILTINS:
        raise ZerotuneError(f"unknown builtin data set {name!r}; choose from {', '.join(BUILTINS)}")
    return BUILTINS[name](cfg) if name == "docstrings" else BUILTINS[name]()
