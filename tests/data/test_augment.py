import math

import pytest
import torch

from zerotune.config import AugmentConfig
from zerotune.data.augment import augment_batch
from zerotune.errors import ZerotuneError


def _x(b=16, c=2, h=5, w=7):
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).view(b, c, h, w)  # all distinct, no zeros


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_identity_when_all_off():
    x = _x()
    assert augment_batch(x, AugmentConfig(), _gen()) is x  # not enabled
    torch.testing.assert_close(augment_batch(x, AugmentConfig(enabled=True), _gen()), x, rtol=0, atol=0)
    torch.testing.assert_close(
        augment_batch(x, AugmentConfig(enabled=True, crop_padding=0, rotate=0, noise=0), _gen()),
        x,
        rtol=0,
        atol=0,
    )


def test_hflip_is_exact():
    x = _x(b=64)
    out = augment_batch(x, AugmentConfig(enabled=True, hflip=True), _gen(1))
    flipped = [torch.equal(o, torch.flip(s, dims=[-1])) for o, s in zip(out, x, strict=True)]
    kept = [torch.equal(o, s) for o, s in zip(out, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each sample is exactly one of the two
    assert 10 < sum(flipped) < 54  # p = 0.5 over 64 samples


def _shift(img, dy, dx):
    """Hand-built crop of the zero-padded image: out[i, j] = img[i + dy, j + dx] or 0 outside."""
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[:, i, j] = img[:, i + dy, j + dx]
    return out


def test_crop_with_padding_matches_hand_shift():
    x, p = _x(b=24), 2
    out = augment_batch(x, AugmentConfig(enabled=True, crop_padding=p), _gen(2))
    seen = set()
    for o, s in zip(out, x, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-p, p + 1)
            for dx in range(-p, p + 1)
            if torch.equal(o, _shift(s, dy, dx))
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 5  # offsets differ per sample


def test_deterministic_for_a_seed_and_shapes():
    cfg = AugmentConfig(
        enabled=True, crop_padding=1, hflip=True, rotate=15, translate=0.1, scale=0.1, noise=0.05
    )
    x = torch.rand(8, 3, 9, 11)
    a = augment_batch(x, cfg, _gen(5))
    b = augment_batch(x, cfg, _gen(5))
    c = augment_batch(x, cfg, _gen(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()


def test_affine_on_a_constant_image_keeps_the_centre():
    # rotation and zoom about the centre move no centre pixel off a constant image
    x = torch.full((6, 1, 15, 15), 3.0)
    out = augment_batch(x, AugmentConfig(enabled=True, rotate=30, scale=0.2), _gen(3))
    torch.testing.assert_close(out[:, :, 5:10, 5:10], x[:, :, 5:10, 5:10], rtol=1e-6, atol=1e-6)
    assert not torch.equal(out, x)  # corners rotate in zeros


def _translate(img, dy, dx):
    """Bilinear shift by (dy, dx) pixels with zeros outside, written out by hand."""
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            sy, sx = i - dy, j - dx
            y0, x0 = math.floor(sy), math.floor(sx)
            fy, fx = sy - y0, sx - x0
            taps = [(y0, x0, (1 - fy) * (1 - fx)), (y0, x0 + 1, (1 - fy) * fx)]
            taps += [(y0 + 1, x0, fy * (1 - fx)), (y0 + 1, x0 + 1, fy * fx)]
            for yy, xx, weight in taps:
                if 0 <= yy < h and 0 <= xx < w:
                    out[:, i, j] += weight * img[:, yy, xx]
    return out


def _centroid(img):
    h, w = img.shape
    total = img.sum()
    ys = (img.sum(1) * torch.arange(h, dtype=img.dtype)).sum() / total
    xs = (img.sum(0) * torch.arange(w, dtype=img.dtype)).sum() / total
    return float(ys), float(xs)


def test_affine_translation_matches_hand_bilinear_shift():
    # channel 0 is a single dot whose centroid reveals the drawn shift; channel 1 must then
    # equal the hand-written bilinear shift of the input by that amount.
    x = torch.zeros(4, 2, 8, 10, dtype=torch.float64)
    x[:, 0, 4, 5] = 1.0
    x[:, 1] = torch.rand(4, 8, 10, generator=_gen(7), dtype=torch.float64)
    out = augment_batch(x, AugmentConfig(enabled=True, translate=0.2), _gen(4))
    shifts = []
    for o, s in zip(out, x, strict=True):
        cy, cx = _centroid(o[0])
        dy, dx = cy - 4, cx - 5
        assert abs(dy) <= 0.2 * 8 + 1e-9 and abs(dx) <= 0.2 * 10 + 1e-9
        torch.testing.assert_close(o, _translate(s, dy, dx), rtol=0, atol=1e-9)
        shifts.append((round(dy, 6), round(dx, 6)))
    assert len(set(shifts)) == 4


def test_rotation_keeps_distances_on_a_wide_image():
    # a dot 3 pixels right of the centre stays about 3 pixels from the centre after a rotation,
    # even though the image is wide (H=9, W=21): rotations are square in pixels.
    x = torch.zeros(8, 1, 9, 21, dtype=torch.float64)
    x[:, 0, 4, 13] = 1.0  # centre is (4, 10)
    out = augment_batch(x, AugmentConfig(enabled=True, rotate=90), _gen(8))
    for o in out:
        cy, cx = _centroid(o[0])
        assert abs(math.hypot(cy - 4, cx - 10) - 3) < 0.3


def test_rejects_non_images():
    with pytest.raises(ZerotuneError, match=r"data.augment: needs images"):
        augment_batch(torch.zeros(4, 3), AugmentConfig(enabled=True, hflip=True), _gen())
