"""``images:DIR``: an image folder with one sub-folder per class.

    DIR/cat/001.png
    DIR/cat/002.jpg
    DIR/dog/001.png

Classes are the sub-folder names, sorted. PNG, JPEG, BMP and GIF files (first frame) are
read with Pillow and resized (bilinear) to the size of the first image; they load as one
channel when every image is greyscale, else as RGB. x is float32 (N, C, H, W), 0..255.

Where the decoded images would not fit in memory (``data.in_memory``: ``auto`` compares
N·C·H·W·4 bytes with half the available memory), x is an :class:`ImageFiles`: the file list,
decoded on demand. Indexing it with a slice or an index tensor gives the same float32 tensor
the in-memory path holds; training reads it through a DataLoader (``data.num_workers``
processes decoding the next steps' batches while the model trains on this one).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from zerotune.config import DataConfig
from zerotune.data.base import Source, Split
from zerotune.data.lazy import LazyRows, Transform, keep_in_memory
from zerotune.errors import ZerotuneError
from zerotune.spec import DataInfo

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _open(path: Path, decode: bool = True) -> Image.Image:
    """The first frame of an image file; with ``decode=False`` only its header is read."""
    try:
        with Image.open(path) as img:
            img.seek(0)  # first frame of an animated GIF
            if not decode:
                return img
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ZerotuneError(f"cannot read the image ({e})", path=path) from None


def _is_grey(img: Image.Image, path: Path) -> bool:
    if img.mode in GREY_MODES:
        return True
    if img.mode == "P":  # a palette image is grey when every palette entry it uses has R = G = B
        rgb = np.asarray(_open(path).convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


def _pixels(img: Image.Image, size: tuple[int, int], mode: str) -> np.ndarray:
    """float32 (H, W) or (H, W, 3), 0..255, at ``size`` (W, H)."""
    if img.mode.startswith("I;16"):  # 16-bit greyscale: 0..65535 → 0..255
        img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257).round().astype(np.uint8))
    elif img.mode in ("I", "F"):  # 32-bit greyscale: clip to the 8-bit range
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32), 0, 255).round().astype(np.uint8))
    img = img.convert(mode)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _to_tensor(arrays: list[np.ndarray], grey: bool) -> torch.Tensor:
    """Stack (H, W) or (H, W, 3) arrays into float32 (N, C, H, W)."""
    x = torch.from_numpy(np.stack(arrays))
    return x.unsqueeze(1) if grey else x.permute(0, 3, 1, 2).contiguous()


class ImageFiles(LazyRows):
    """Images decoded from their files on demand (in threads: Pillow releases the GIL), looking
    like the float32 (N, C, H, W) tensor they make, 0..255 before the transforms."""

    def __init__(self, files: list[Path], size: tuple[int, int], grey: bool, rows: list[int] | None = None,
                 transforms: tuple[Transform, ...] = (), device: torch.device | str = "cpu") -> None:
        super().__init__(range(len(files)) if rows is None else rows, (1 if grey else 3, size[1], size[0]),
                         transforms, device)
        self.files, self.size, self.grey = files, size, grey

    def view(self, rows: list[int], transforms: tuple[Transform, ...], device: torch.device) -> ImageFiles:
        return ImageFiles(self.files, self.size, self.grey, rows, transforms, device)

    def read(self, rows: list[int]) -> torch.Tensor:
        mode = "L" if self.grey else "RGB"
        read = lambda i: _pixels(_open(self.files[i]), self.size, mode)  # noqa: E731
        with ThreadPoolExecutor(min(len(rows), os.cpu_count() or 1, 8)) as pool:
            return _to_tensor(list(pool.map(read, rows)), self.grey)


def image_tensor(files: list[Path], size: tuple[int, int], grey: bool) -> torch.Tensor:
    """The images of ``files`` as float32 (N, C, H, W), 0..255, resized to ``size`` (W, H) and
    converted to one channel (``grey``) or three; a file that cannot be decoded is named."""
    mode = "L" if grey else "RGB"
    return _to_tensor([_pixels(_open(p), size, mode) for p in files], grey)


def load_images(arg: str, cfg: DataConfig | None = None) -> Source:
    """``images:DIR`` → Source of float32 (N, C, H, W) images (a tensor or :class:`ImageFiles`) and class ids."""
    root = Path(arg)
    if not root.is_dir():
        raise ZerotuneError("image folder not found" if not root.exists() else "not a folder", path=root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ZerotuneError("no class sub-folders (expected DIR/<class>/<image files>)", path=root)
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        files += [(p, label) for p in found]
    if not files:
        raise ZerotuneError(
            f"no images ({', '.join(sorted(EXTENSIONS))}) in the class sub-folders", path=root
        )
    y = torch.tensor([label for _, label in files], dtype=torch.long)
    headers = [_open(p, decode=False) for p, _ in files]
    size = headers[0].size  # (W, H)
    grey = all(_is_grey(img, p) for img, (p, _) in zip(headers, files, strict=True))
    n_bytes = len(files) * (1 if grey else 3) * size[0] * size[1] * 4
    if not keep_in_memory(cfg.in_memory if cfg is not None else "auto", n_bytes):
        x = ImageFiles([p for p, _ in files], size, grey)
    else:
        mode = "L" if grey else "RGB"
        x = _to_tensor([_pixels(_open(p), size, mode) for p, _ in files], grey)
    return Source(Split(x, y), DataInfo("image", list(x.shape[1:]), classes=classes))
