"""arrays:DIR (x.npy memory-mapped, y.npy): rows read per batch match the arrays held in memory."""

import numpy as np
import pytest
import torch

import zerotune
from tests.helpers import train_from_disk_and_memory
from zerotune.cli import main
from zerotune.config import DataConfig
from zerotune.data.sources import MappedArray, load_source
from zerotune.data.splits import load_data
from zerotune.errors import ZerotuneError


def write_folder(folder, x, y):
    folder.mkdir()
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """120 uint8 images (3, 8, 8) in 4 classes: class k has channel k % 3 bright in its row band."""
    rng = np.random.default_rng(0)
    y = np.arange(120) % 4
    x = rng.integers(0, 150, (120, 3, 8, 8), dtype=np.uint8)
    for i, k in enumerate(y):
        x[i, k % 3, 2 * k : 2 * k + 2] = 255
    return write_folder(tmp_path_factory.mktemp("arr") / "img", x, y)


def test_rows_read_are_the_rows_in_memory(images):
    memory = load_source(f"arrays:{images}", DataConfig(in_memory=True)).train
    mapped = load_source(f"arrays:{images}", DataConfig(in_memory=False)).train
    assert isinstance(mapped.x, MappedArray) and mapped.x.shape == memory.x.shape == (120, 3, 8, 8)
    assert torch.equal(mapped.y, memory.y)
    torch.testing.assert_close(mapped.x[:], memory.x, rtol=0, atol=0)
    index = torch.tensor([99, 3, 3, 57])
    torch.testing.assert_close(mapped.x[index], memory.x[index], rtol=0, atol=0)
    part = mapped.take(torch.tensor([10, 20, 30]))
    assert isinstance(part.x, MappedArray)
    torch.testing.assert_close(part.x[1:], memory.x[[20, 30]], rtol=0, atol=0)


def test_npz_and_folder_load_the_same(images, tmp_path):
    x, y = np.load(images / "x.npy"), np.load(images / "y.npy")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    a, b = load_source(f"arrays:{tmp_path / 'd.npz'}"), load_source(f"arrays:{images}", DataConfig(in_memory=True))
    assert a.info == b.info and torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)


def test_tabular_statistics_per_feature(tmp_path):
    """Regression on (N, F) float64 features: per-feature mean/std from the mapped rows equal numpy's."""
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 3.0, (300, 6)) * np.arange(1, 7)
    y = x @ np.linspace(-1, 1, 6) + rng.normal(0, 0.1, 300)
    folder = write_folder(tmp_path / "tab", x, y)
    cfg = dict(train=f"arrays:{folder}", val_split=0.0, test_split=0.0)
    mapped = load_data(DataConfig(**cfg, in_memory=False), "regression")
    memory = load_data(DataConfig(**cfg, in_memory=True), "regression")
    rows = x.astype(np.float32).astype(np.float64)  # the float32 values both paths hold
    np.testing.assert_allclose(mapped.preprocess.x_mean, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(mapped.preprocess.x_std, rows.std(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(mapped.preprocess.x_std, memory.preprocess.x_std, rtol=1e-12)
    torch.testing.assert_close(mapped.train.x[:], memory.train.x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_from_mapped_rows_equals_training_in_memory(images, tmp_path, workers):
    runs = train_from_disk_and_memory(tmp_path, f"arrays:{images}", batch_size=16, workers=workers)
    assert zerotune.evaluate(runs["disk"])["accuracy"] == zerotune.evaluate(runs["memory"])["accuracy"]


def test_bad_folders_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZerotuneError, match=r"empty: expected x.npy in the folder"):
        load_source(f"arrays:{tmp_path / 'empty'}")
    short = write_folder(tmp_path / "short", np.zeros((5, 3)), np.zeros(4, dtype=np.int64))
    with pytest.raises(ZerotuneError, match=r"short: x has 5 rows but y has 4"):
        load_source(f"arrays:{short}")
    bad = write_folder(tmp_path / "bad", np.zeros((5, 3)), np.zeros(5, dtype=np.int64))
    (bad / "x.npy").write_bytes(b"not an array")
    assert main(["train", "configs/digits_mlp.yaml", "--set", f"data.train=arrays:{bad}",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.npy: not a readable .npy file" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_mapped_x_is_scanned_for_values_that_are_not_finite(tmp_path):
    """A memory-mapped x.npy is scanned before training, in chunks of rows (here 3 rows of 8
    float64 = 192 bytes at a time, as a file larger than memory would be); a float64 beyond
    float32's range would become an infinity and is refused too."""
    from zerotune.data.sources import _check_finite

    x = np.zeros((12, 8))
    for i, value in enumerate((np.nan, -np.inf, 1e300)):
        x[10, 5] = value
        folder = write_folder(tmp_path / f"a{i}", x, np.arange(12) % 2)
        message = r"x holds NaN, an infinity or a value beyond float32 \(first in row 10\)"
        with pytest.raises(ZerotuneError, match=rf"a{i}: {message}"):
            load_source(f"arrays:{folder}", DataConfig(in_memory=False))
        with pytest.raises(ZerotuneError, match=message):
            _check_finite(np.load(folder / "x.npy", mmap_mode="r"), "x", folder, chunk_bytes=192)
    x[10, 5] = 3.0e38  # within float32
    ok = write_folder(tmp_path / "ok", x, np.arange(12) % 2)
    assert load_source(f"arrays:{ok}", DataConfig(in_memory=False)).train.x.shape == (12, 8)
