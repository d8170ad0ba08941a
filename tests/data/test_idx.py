import gzip

import numpy as np
import pytest
import torch

from tests.helpers import write_digits_idx, write_idx
from zerotune.config import DataConfig
from zerotune.data.idx import read_idx
from zerotune.data.sources import load_source
from zerotune.data.splits import load_data
from zerotune.errors import ZerotuneError


def _images(n=6, h=5, w=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, h, w), dtype=np.uint8), rng.integers(0, 10, size=n, dtype=np.uint8)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    x, y = _images()
    xt, yt = _images(n=3, seed=1)
    write_idx(tmp_path, x, y, "train", gz=gz)
    write_idx(tmp_path, xt, yt, "t10k", gz=gz)
    src = load_source(f"idx:{tmp_path}")
    assert src.train.x.dtype == torch.float32 and src.train.y.dtype == torch.int64
    torch.testing.assert_close(src.train.x, torch.from_numpy(x).float().unsqueeze(1), rtol=0, atol=0)
    torch.testing.assert_close(src.train.y, torch.from_numpy(y).long(), rtol=0, atol=0)
    torch.testing.assert_close(src.test.x, torch.from_numpy(xt).float().unsqueeze(1), rtol=0, atol=0)
    assert src.info.kind == "image" and src.info.input_shape == [1, 5, 4]
    assert src.info.classes == [str(i) for i in range(10)]


def test_idx_without_test_files(tmp_path):
    x, y = _images()
    write_idx(tmp_path, x, y, "train")
    assert load_source(f"idx:{tmp_path}").test is None


def test_digits_idx_through_load_data(tmp_path):
    write_digits_idx(tmp_path)
    data = load_data(DataConfig(train=f"idx:{tmp_path}", val_split=0.1), seed=0)
    assert data.train.x.shape[1:] == (1, 28, 28)
    assert len(data.test) == 297 and len(data.train) + len(data.val) == 1500
    # normalised with train statistics: mean ~0, std ~1
    assert abs(float(data.train.x.mean())) < 1e-3
    assert abs(float(data.train.x.std()) - 1.0) < 1e-3


def test_truncated_file(tmp_path):
    x, y = _images()
    images, _ = write_idx(tmp_path, x, y, gz=False)
    images.write_bytes(images.read_bytes()[:-7])
    with pytest.raises(ZerotuneError, match=r"train-images-idx3-ubyte: dims \[6, 5, 4\]: truncated"):
        load_source(f"idx:{tmp_path}")


def test_truncated_gzip(tmp_path):
    x, y = _images()
    images, _ = write_idx(tmp_path, x, y, gz=True)
    images.write_bytes(images.read_bytes()[:20])
    with pytest.raises(ZerotuneError, match=r"train-images-idx3-ubyte.gz: cannot read"):
        load_source(f"idx:{tmp_path}")


def test_trailing_bytes(tmp_path):
    x, y = _images()
    _, labels = write_idx(tmp_path, x, y, gz=False)
    labels.write_bytes(labels.read_bytes() + b"\x00")
    with pytest.raises(ZerotuneError, match=r"train-labels-idx1-ubyte: dims \[6\]: has trailing bytes"):
        load_source(f"idx:{tmp_path}")


def test_bad_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + bytes(16)))
    with pytest.raises(ZerotuneError, match=r"train-images-idx3-ubyte.gz: magic number 0x12345678"):
        read_idx(path, ndim=3)


def test_wrong_dimensions(tmp_path):
    x, y = _images()
    images, labels = write_idx(tmp_path, x, y, gz=False)
    with pytest.raises(
        ZerotuneError, match=r"train-labels-idx1-ubyte: magic number 0x00000801: 1 dimensions"
    ):
        read_idx(labels, ndim=3)


def test_count_mismatch(tmp_path):
    x, y = _images()
    write_idx(tmp_path, x, y[:4], gz=True)
    with pytest.raises(ZerotuneError, match=r"train-images-idx3-ubyte.gz: dims: 6 images but .* 4 labels"):
        load_source(f"idx:{tmp_path}")


def test_missing_files(tmp_path):
    with pytest.raises(ZerotuneError, match=r"missing train-images-idx3-ubyte\[.gz\] and train-labels"):
        load_source(f"idx:{tmp_path}")
    with pytest.raises(ZerotuneError, match=r"nope: IDX folder not found"):
        load_source(f"idx:{tmp_path / 'nope'}")
