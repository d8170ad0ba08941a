"""Image augmentation for a whole batch at once, on the batch's device.

For a batch x (B, C, H, W), in this order, each with its own random draw per sample:

1. random crop: zero-pad by p = ``crop_padding`` on every side, then take the H×W window
   at offset (dy, dx) ~ U{0..2p}²: out[b, :, i, j] = pad(x)[b, :, i + dy_b, j + dx_b];
2. horizontal flip with probability 0.5 (``hflip``): out[b, :, i, j] = x[b, :, i, W-1-j];
3. small affine (``rotate`` degrees, ``translate`` fraction of the size, ``scale``): the output
   pixel at p samples the input (bilinear, zeros outside) at A⁻¹(p - t), with
   A = s·R(θ), θ ~ U(-rotate, rotate), s ~ U(1 - scale, 1 + scale), t ~ U(-translate, translate)·size,
   built with ``affine_grid`` / ``grid_sample``;
4. Gaussian noise (``noise``): out = x + noise·ε, ε ~ N(0, 1).

All random numbers come from the given CPU ``torch.Generator`` and are then moved to
x's device, so a seed gives the same augmentation on every device. A process that holds only
rows ``rows`` of an n-image batch (one process of several) draws the numbers of all n images and
keeps its rows' own, so each image is augmented exactly as in the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zerotune.config import AugmentConfig
from zerotune.errors import ZerotuneError


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator, rows: slice = slice(None),
                n: int | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` then crop back to (H, W) at a random offset per sample."""
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n or b), generator=generator)[:, rows].to(x.device)  # (2, B)
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]  # (B, 1, 1)
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def random_hflip(x: torch.Tensor, generator: torch.Generator, rows: slice = slice(None),
                 n: int | None = None) -> torch.Tensor:
    """Flip each sample left-right with probability 0.5."""
    flip = (torch.rand(n or x.shape[0], generator=generator)[rows] < 0.5).to(x.device)  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_affine(
    x: torch.Tensor, rotate: float, translate: float, scale: float, generator: torch.Generator,
    rows: slice = slice(None), n: int | None = None,
) -> torch.Tensor:
    """Rotate by ±``rotate`` degrees, shift by ±``translate`` of the size, zoom by 1 ± ``scale``."""
    b, _, h, w = x.shape
    n = n or b
    angle = _uniform(n, -rotate, rotate, generator)[rows] * (math.pi / 180)  # (B,)
    zoom = _uniform(n, 1 - scale, 1 + scale, generator)[rows]  # (B,)
    shift = _uniform(2 * n, -translate, translate, generator).view(2, n)[:, rows]  # (2, B), fraction of size
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # A⁻¹ = R(-θ)/s in pixel units; affine_grid works in [-1, 1] coordinates where x spans W
    # and y spans H, so conjugate by diag(W/2, H/2) to keep rotations square on wide images.
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = sin * (h / w)
    theta[:, 1, 0] = -sin * (w / h)
    theta[:, 1, 1] = cos
    t = -2 * shift  # (2, B): a shift of f·size is 2f in [-1, 1] units; the grid maps output → input
    theta[:, 0, 2] = theta[:, 0, 0] * t[0] + theta[:, 0, 1] * t[1]
    theta[:, 1, 2] = theta[:, 1, 0] * t[0] + theta[:, 1, 1] * t[1]
    theta = theta.to(device=x.device, dtype=x.dtype)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator, rows: slice = slice(None),
                  n: int | None = None) -> torch.Tensor:
    """Augment an image batch (B, C, H, W) as set in ``cfg`` (see the module docstring).

    Args:
        x: float images (B, C, H, W) on any device.
        cfg: which augmentations to apply; ``cfg.enabled = False`` returns ``x`` unchanged.
        generator: a CPU generator; every random number is drawn from it.
        rows: with ``n``, x is ``batch[rows]`` of a batch of n images, augmented as within that batch.
        n: the size of that whole batch (default: B, x is the whole batch).

    Returns:
        A new tensor of the same shape, dtype and device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> augment_batch(torch.rand(8, 3, 32, 32), AugmentConfig(enabled=True, hflip=True), g).shape
        torch.Size([8, 3, 32, 32])
    """
    if not cfg.enabled:
        return x
    if x.ndim != 4:
        raise ZerotuneError(f"data.augment: needs images (B, C, H, W), got a batch of shape {tuple(x.shape)}")
    if cfg.crop_padding > 0:
        x = random_crop(x, cfg.crop_padding, generator, rows, n)
    if cfg.hflip:
        x = random_hflip(x, generator, rows, n)
    if cfg.rotate > 0 or cfg.translate > 0 or cfg.scale > 0:
        x = random_affine(x, cfg.rotate, cfg.translate, cfg.scale, generator, rows, n)
    if cfg.noise > 0:
        noise = torch.randn((n or len(x), *x.shape[1:]), generator=generator, dtype=x.dtype)[rows]  # (B, C, H, W)
        x = x + cfg.noise * noise.to(x.device)
    return x
