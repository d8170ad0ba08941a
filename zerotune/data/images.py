"""``images:DIR``: an image folder with one sub-folder per class.

    DIR/cat/001.png
    DIR/cat/002.jpg
    DIR/dog/001.png

Classes are the sub-folder names, sorted. PNG, JPEG, BMP and GIF files (first frame) are
read with Pillow and resized (bilinear) to the size of the first image; they load as one
channel when every image is greyscale, else as RGB. x is float32 (N, C, H, W), 0..255.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from zerotune.data.base import DataInfo, Source, Split
from zerotune.errors import ZerotuneError

if TYPE_CHECKING:
    from zerotune.config import DataConfig

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _read(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.seek(0)  # first frame of an animated GIF
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ZerotuneError(f"cannot read the image ({e})", path=path) from None


def _is_grey(img: Image.Image) -> bool:
    if img.mode in GREY_MODES:
        return True
    if img.mode == "P":  # a palette image is grey when every palette entry has R = G = B
        rgb = np.asarray(img.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


def load_images(arg: str, cfg: DataConfig | None = None) -> Source:
    """``images:DIR`` → Source of float32 (N, C, H, W) images and their class ids."""
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
    images = [_read(p) for p, _ in files]
    size = images[0].size  # (W, H)
    grey = all(_is_grey(img) for img in images)
    mode = "L" if grey else "RGB"
    arrays = []
    for img in images:
        if img.mode.startswith("I;16"):  # 16-bit greyscale: 0..65535 → 0..255
            img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257).round().astype(np.uint8))
        elif img.mode in ("I", "F"):  # 32-bit greyscale: clip to the 8-bit range
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32), 0, 255).round().astype(np.uint8))
        img = img.convert(mode)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays))  # (N, H, W) or (N, H, W, 3)
    x = x.unsqueeze(1) if grey else x.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    y = torch.tensor([label for _, label in files], dtype=torch.long)
    return Source(Split(x, y), DataInfo("image", list(x.shape[1:]), classes=classes))
