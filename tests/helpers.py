"""Small data files the tests write for themselves (IDX digits, ...)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def write_idx(
    directory: str | Path, images: np.ndarray, labels: np.ndarray, prefix: str = "train", gz: bool = True
) -> tuple[Path, Path]:
    """Write uint8 ``images`` (N, H, W) and ``labels`` (N,) as ``{prefix}-images-idx3-ubyte[.gz]``
    and ``{prefix}-labels-idx1-ubyte[.gz]``. Returns the two paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.uint8)
    n, h, w = images.shape
    blobs = {
        f"{prefix}-images-idx3-ubyte": b"\x00\x00\x08\x03"
        + np.array([n, h, w], ">u4").tobytes()
        + images.tobytes(),
        f"{prefix}-labels-idx1-ubyte": b"\x00\x00\x08\x01"
        + np.array([len(labels)], ">u4").tobytes()
        + labels.tobytes(),
    }
    paths = []
    for name, blob in blobs.items():
        path = directory / (name + ".gz" if gz else name)
        path.write_bytes(gzip.compress(blob) if gz else blob)
        paths.append(path)
    return paths[0], paths[1]


def digits_uint8(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits scaled to 0..255 and resized (bilinear) to ``size``×``size``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (N, 1, size, size)
    images = x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()
    return images, d.target.astype(np.uint8)


def write_digits_idx(directory: str | Path, size: int = 28, gz: bool = True) -> Path:
    """Write the digits as MNIST-format IDX files: the first 1,500 as train, the other 297 as t10k."""
    images, labels = digits_uint8(size)
    write_idx(directory, images[:1500], labels[:1500], prefix="train", gz=gz)
    write_idx(directory, images[1500:], labels[1500:], prefix="t10k", gz=gz)
    return Path(directory)


def write_char_shards(root: Path, text: str, docs: int, val_fraction: float) -> Path:
    """``docs`` documents of ``text`` + "doc i" in root/docs, a character tokenizer trained on them
    (root/tok, 64 ids) and their token shards (root/shards, returned)."""
    from zerotune.data.shards import prepare
    from zerotune.data.tokenizer import train_tokenizer

    folder = root / "docs"
    folder.mkdir()
    for i in range(docs):
        (folder / f"{i:02d}.txt").write_text(text + f"doc {i}\n")
    train_tokenizer(f"text:{folder}", 64, root / "tok", kind="char", progress=False)
    prepare(f"text:{folder}", root / "tok", root / "shards", val_fraction=val_fraction, progress=False)
    return root / "shards"


def train_from_disk_and_memory(tmp: Path, spec: str, batch_size: int, workers: int) -> dict[str, Path]:
    """The digits_cnn recipe on ``spec`` (with augmentation and dropout) trained twice, with the data
    held in memory and read from disk by ``workers`` DataLoader processes; asserts that the final
    weights are bit-identical and returns the two run folders ("memory", "disk")."""
    import zerotune
    from zerotune.files import load_weights

    common = [f"data.train={spec}", "train.epochs=2", f"train.batch_size={batch_size}", "train.progress=false",
              "data.augment.enabled=true", "data.augment.hflip=true", "model.dropout=0.3"]
    runs = {name: zerotune.train("configs/digits_cnn.yaml", out=tmp / name, overrides=common + extra,
                                 log=lambda *a: None)
            for name, extra in {"memory": ["data.in_memory=true"],
                                "disk": ["data.in_memory=false", f"data.num_workers={workers}"]}.items()}
    a, b = load_weights(runs["memory"] / "model.safetensors"), load_weights(runs["disk"] / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    return runs


def n_parameters(model: torch.nn.Module) -> int:
    """Every parameter of ``model``, counted once."""
    return sum(p.numel() for p in model.parameters())
