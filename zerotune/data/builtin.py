"""Data sets that ship with installed packages, so every recipe runs offline.

    builtin:digits    scikit-learn's 1,797 8×8 grey-scale digits (10 classes), as (N, 1, 8, 8) images
    builtin:diabetes  scikit-learn's 442-patient regression set, 10 numeric features
    builtin:docstrings  text classification from this Python's standard library: the first paragraph
                      of each docstring of the public functions, classes and methods of 20 modules,
                      labelled by topic (files, math, text, time; see DOCSTRING_TOPICS); about 770
                      examples, tokenised like a text CSV (``data.tokenizer``, ``data.max_length``)
    builtin:stdlib_topics  the same, harder: 13 topics over 100 modules (files, math, text, time,
                      network, concurrency, formats, archives, testing, email, structures, functional,
                      runtime; see STDLIB_TOPICS); about 2,800 examples, median 8 words

A paragraph is kept if it has 20 characters or more and is found under one topic only (a text
found under two topics tells neither apart and is dropped). The modules are read in a fresh
interpreter and the rows sorted by text, so the same Python always gives the same examples in the
same order, whatever the calling process has imported or patched.
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

STDLIB_TOPICS = {
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile", "fnmatch", "filecmp", "stat"],
    "math": ["math", "cmath", "statistics", "fractions", "decimal", "random", "numbers"],
    "text": ["re", "string", "textwrap", "difflib", "unicodedata", "codecs"],
    "time": ["datetime", "time", "calendar", "zoneinfo", "sched"],
    "network": ["socket", "ssl", "http.client", "http.server", "urllib.request", "urllib.parse", "ftplib",
                "smtplib", "ipaddress", "socketserver"],
    "concurrency": ["threading", "multiprocessing", "concurrent.futures", "queue", "asyncio", "subprocess",
                    "selectors"],
    "formats": ["json", "csv", "configparser", "plistlib", "tomllib", "xml.etree.ElementTree", "html.parser",
                "base64", "binascii"],
    "archives": ["zipfile", "tarfile", "gzip", "bz2", "lzma", "zlib", "zipimport"],
    "testing": ["unittest", "unittest.mock", "doctest", "pdb", "traceback", "timeit", "trace", "cProfile",
                "pstats"],
    "email": ["email.message", "email.parser", "email.utils", "email.headerregistry", "mailbox", "mimetypes"],
    "structures": ["collections", "heapq", "bisect", "array", "enum", "dataclasses", "copy", "weakref", "types"],
    "functional": ["functools", "itertools", "operator", "contextlib", "abc", "typing"],
    "runtime": ["sys", "sysconfig", "platform", "importlib", "inspect", "gc", "atexit", "site", "warnings",
                "logging"],
}


def docstring_texts(topics: dict[str, list[str]] = DOCSTRING_TOPICS) -> list[tuple[str, str]]:
    """(first docstring paragraph, topic) pairs, sorted, from the modules of each topic in ``topics``.

    The modules are read in a fresh interpreter (``python -I``), so nothing this process has
    imported or patched changes the examples: a command line's own ``warnings.formatwarning``, or a
    library that adds methods to ``logging.Logger``, would otherwise add or remove texts and shift
    every seeded split. A paragraph found under two topics is dropped.

    Raises:
        ZerotuneError: the fresh interpreter failed.
    """
    import inspect
    import json
    import subprocess
    import sys

    code = inspect.getsource(_scan) + "\nimport json, sys\nprint(json.dumps(_scan(json.loads(sys.argv[1]))))\n"
    done = subprocess.run([sys.executable, "-I", "-c", code, json.dumps(topics)], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ZerotuneError(f"reading the standard library's docstrings failed: {last}")
    seen: dict[str, list[str]] = json.loads(done.stdout)
    return sorted((text, t[0]) for text, t in seen.items() if len(t) == 1)


def _scan(topics: dict[str, list[str]]) -> dict[str, list[str]]:
    """text → the topics it is found under: the first docstring paragraph (20 characters or more) of
    each public function, class and method (of a class the module's package defines) of each module.

    Run by :func:`docstring_texts` in a fresh interpreter, so it imports the standard library only.
    A module this Python lacks is skipped, and so is a class attribute that cannot be read (Enum.name
    is readable on members only); reading a deprecated alias (``typing.io``) warns, unheard.
    """
    import importlib
    import inspect
    import warnings

    seen: dict[str, list[str]] = {}
    warnings.simplefilter("ignore", DeprecationWarning)
    for topic, modules in topics.items():
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError:
                continue
            home = module_name.split(".")[0]
            for name in sorted(dir(module)):
                if name.startswith("_"):
                    continue
                obj = getattr(module, name)
                objs = [obj]
                if inspect.isclass(obj) and getattr(obj, "__module__", "").split(".")[0].lstrip("_") == home:
                    for a in sorted(vars(obj)):
                        if not a.startswith("_"):
                            try:
                                objs.append(getattr(obj, a))
                            except AttributeError:
                                continue
                for o in objs:
                    doc = inspect.getdoc(o) if callable(o) else None
                    if doc:
                        text = " ".join(doc.strip().split("\n\n")[0].split())
                        if len(text) >= 20 and topic not in seen.setdefault(text, []):
                            seen[text].append(topic)
    return seen


def _text_source(topics: dict[str, list[str]], spec: str, cfg: DataConfig | None) -> Source:
    cfg = cfg or DataConfig()
    rows = [[text, topic] for text, topic in docstring_texts(topics)]
    header = [cfg.text_column, cfg.label_column]
    return table_source(header, rows, list(range(1, len(rows) + 1)), Path(spec), cfg)


def docstrings(cfg: DataConfig | None = None) -> Source:
    return _text_source(DOCSTRING_TOPICS, "builtin:docstrings", cfg)


def stdlib_topics(cfg: DataConfig | None = None) -> Source:
    return _text_source(STDLIB_TOPICS, "builtin:stdlib_topics", cfg)


BUILTINS = {"digits": digits, "diabetes": diabetes, "docstrings": docstrings, "stdlib_topics": stdlib_topics}
TEXT_SETS = {"docstrings": DOCSTRING_TOPICS, "stdlib_topics": STDLIB_TOPICS}  # text builtins: name → topic table


def load_builtin(name: str, cfg: DataConfig | None = None) -> Source:
    if name not in BUILTINS:
        raise ZerotuneError(f"unknown builtin data set {name!r}; choose from {', '.join(BUILTINS)}")
    return BUILTINS[name](cfg) if name in TEXT_SETS else BUILTINS[name]()
