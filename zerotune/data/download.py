"""Download the standard image data sets, checked against their published MD5 sums.

    mnist           4 IDX files      → use as idx:DEST
    fashion-mnist   4 IDX files      → use as idx:DEST
    cifar10         one tar.gz       → extracted to DEST/cifar-10-batches-py, use as cifar:DEST

Each file is streamed to a temporary file inside DEST, its checksum verified, and only then
renamed into place, so an interrupted or corrupted download never leaves a file that looks
good. A file already present with the right checksum is not downloaded again; one with another
checksum (a different or damaged copy) is replaced only with ``overwrite``. The base URL
can be replaced with ``mirror`` or the ``ZEROTUNE_DATA_MIRROR`` environment variable (a
folder URL holding the same file names).

Command line: ``zerotune data download NAME DEST [--mirror URL] [--overwrite]``.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from zerotune.errors import ZerotuneError
from zerotune.files import atomic_write

MIRROR_ENV = "ZEROTUNE_DATA_MIRROR"
IDX_NAMES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


@dataclass(frozen=True)
class Dataset:
    """Where a data set lives: base URL, (file name, MD5) pairs, and the spec that reads it."""

    base_url: str
    files: tuple[tuple[str, str], ...]
    spec: str  # the data spec for the download folder, with {dest}
    extract: bool = False  # a tar.gz to unpack into dest


# MD5 sums as published with the data sets (the same ones torchvision checks).
DATASETS: dict[str, Dataset] = {
    "mnist": Dataset(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        (
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        "idx:{dest}",
    ),
    "fashion-mnist": Dataset(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
        "idx:{dest}",
    ),
    "cifar10": Dataset(
        "https://www.cs.toronto.edu/~kriz/",
        (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        "cifar:{dest}",
        extract=True,
    ),
}

def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, target: Path, md5: str, timeout: float = 60.0) -> Path:
    """Stream ``url`` to a temporary file next to ``target``, check its MD5, rename it to ``target``."""

    def write(tmp: Path) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with open(tmp, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise ZerotuneError(
                    f"could not reach {url} ({reason}); download it by hand, put it at {target} and run again"
                ) from None
        got = digest.hexdigest()
        if got != md5:
            raise ZerotuneError(
                f"checksum mismatch: expected md5 {md5}, got {got}; the download was deleted", path=target
            )

    atomic_write(target, write)
    return target


def extract_tar(archive: Path, dest: Path) -> list[Path]:
    """Unpack a tar.gz into ``dest`` with the ``data`` filter (no absolute paths, links out, devices)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ZerotuneError(f"cannot extract the archive ({e})", path=archive) from None
    return [dest / m.name for m in members]


def download(name: str, dest: str | Path, mirror: str | None = None, overwrite: bool = False) -> list[Path]:
    """Download data set ``name`` into ``dest`` and verify it.

    Args:
        name: ``mnist``, ``fashion-mnist`` or ``cifar10``.
        dest: the folder to fill (created if missing).
        mirror: a base URL to use instead of the official one (default: ``$ZEROTUNE_DATA_MIRROR``).
        overwrite: download again a file of the same name whose checksum is not the published one.

    Returns:
        The data files now in ``dest``: the IDX files, or for CIFAR-10 the extracted batch files.

    Raises:
        ZerotuneError: unknown name, unreachable URL (the message says where to put the files
            by hand), a checksum mismatch (the bad download is deleted), or a file of the same
            name that is not the published one, without ``overwrite`` (checked before any download).

    Example:
        >>> download("mnist", "data/mnist")  # then train with data.train = "idx:data/mnist"
    """
    if name not in DATASETS:
        raise ZerotuneError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    ds = DATASETS[name]
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ZerotuneError("exists and is not a folder", path=dest)
    missing = []
    for filename, md5 in ds.files:
        target = dest / filename
        have = md5sum(target) if target.is_file() else None
        if have == md5:
            continue
        if target.exists() and (target.is_dir() or not overwrite):
            raise ZerotuneError(f"exists and is not the published file (md5 {md5}); pass --overwrite to download "
                                "it again, or choose another folder", path=target)
        missing.append((filename, md5))
    dest.mkdir(parents=True, exist_ok=True)
    base = mirror or os.environ.get(MIRROR_ENV) or ds.base_url
    base = base if base.endswith("/") else base + "/"
    for filename, md5 in missing:
        fetch(base + filename, dest / filename, md5)
    out: list[Path] = []
    for filename, _ in ds.files:
        out += extract_tar(dest / filename, dest) if ds.extract else [dest / filename]
    return out
