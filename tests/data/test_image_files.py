"""images:DIR read from the files per batch (data.in_memory: false): the same numbers as in memory."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import train_from_disk_and_memory
from zerotune.config import DataConfig
from zerotune.data.images import ImageFiles
from zerotune.data.lazy import keep_in_memory
from zerotune.data.sources import load_source
from zerotune.data.splits import load_data
from zerotune.errors import ZerotuneError
from zerotune.train.tasks import SupervisedTask


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes × 12 RGB images of 8×8 (two of 10×6, resized on reading); class k has channel k bright."""
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    for k in range(3):
        (root / f"c{k}").mkdir()
        for i in range(12):
            shape = (6, 10, 3) if i == 5 else (8, 8, 3)
            a = rng.integers(0, 200, shape, dtype=np.uint8)
            a[..., k] = 255
            Image.fromarray(a).save(root / f"c{k}" / f"{i:02d}.png")
    return root


def test_indexing_decodes_what_memory_holds(folder):
    memory = load_source(f"images:{folder}", DataConfig(in_memory=True)).train
    files = load_source(f"images:{folder}", DataConfig(in_memory=False)).train
    assert isinstance(files.x, ImageFiles) and not isinstance(memory.x, ImageFiles)
    assert files.x.shape == memory.x.shape == (36, 3, 8, 8)
    assert torch.equal(files.y, memory.y)
    torch.testing.assert_close(files.x[:], memory.x, rtol=0, atol=0)
    index = torch.tensor([30, 2, 17, 2])
    torch.testing.assert_close(files.x[index], memory.x[index], rtol=0, atol=0)
    part = files.take(torch.tensor([4, 9, 33]))  # a subset stays on disk
    assert isinstance(part.x, ImageFiles) and len(part) == 3
    torch.testing.assert_close(part.x[1:], memory.x[[9, 33]], rtol=0, atol=0)
    double = files.x.map(lambda x: 2 * x).map(lambda x: x + 1)  # transforms apply in order
    torch.testing.assert_close(double[[7]], 2 * memory.x[[7]] + 1, rtol=0, atol=0)


def test_splits_and_statistics_match_memory(folder):
    cfg = dict(train=f"images:{folder}", val_split=0.2, test_split=0.2)
    memory, files = load_data(DataConfig(**cfg, in_memory=True)), load_data(DataConfig(**cfg, in_memory=False))
    for name in ("x_mean", "x_std"):  # one pass over the files, chunk by chunk, vs torch on the whole tensor
        np.testing.assert_allclose(getattr(files.preprocess, name), getattr(memory.preprocess, name), rtol=1e-12)
    for split in ("train", "val", "test"):
        a, b = getattr(memory, split), getattr(files, split)
        assert torch.equal(a.y, b.y)
        torch.testing.assert_close(b.x[:], a.x, rtol=1e-6, atol=1e-6)  # normalised as they are decoded


def test_channel_statistics_by_hand(tmp_path):
    """Chunks combined: mean and unbiased std per channel equal numpy's over all pixels."""
    rng = np.random.default_rng(1)
    (tmp_path / "a").mkdir()
    arrays = [rng.integers(0, 256, (5, 4, 3), dtype=np.uint8) for _ in range(7)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / "a" / f"{i}.png")
    x = load_source(f"images:{tmp_path}", DataConfig(in_memory=False)).train.x
    mean, std = x.stats(1, chunk=3)
    pixels = np.stack(arrays).astype(np.float64).reshape(-1, 3)
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(0, ddof=1), rtol=1e-12)


def test_auto_keeps_what_fits():
    assert keep_in_memory("auto", 1024) and keep_in_memory(True, 2**60)
    assert not keep_in_memory("auto", 2**60) and not keep_in_memory(False, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_from_files_equals_training_in_memory(folder, tmp_path, workers):
    """The batches (seeded order, augmentation) and so the final weights are bit-identical."""
    train_from_disk_and_memory(tmp_path, f"images:{folder}", batch_size=8, workers=workers)


def test_step_order_restarts_where_asked(folder):
    """Asking for a step out of order (as resuming does) gives that step's batch."""
    data = load_data(DataConfig(train=f"images:{folder}", in_memory=False))
    kw = dict(batch_size=5, seed=3, loss="auto", label_smoothing=0.0, metrics=[])
    task = SupervisedTask(data, num_workers=1, **kw)
    order = [task.batch(s) for s in range(6)]
    again = task.batch(4)
    torch.testing.assert_close(again, order[4], rtol=0, atol=0)
    index = task.order.indices(4)
    torch.testing.assert_close(again[0], data.train.x[index], rtol=0, atol=0)


def test_unreadable_file_mid_training_is_one_line(folder, tmp_path):
    """A file whose header reads but whose pixels do not: one line naming it, from the worker."""
    import shutil

    root = tmp_path / "img"
    shutil.copytree(folder, root)
    bad = root / "c1" / "03.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header survives, the pixel data is cut
    data = load_data(DataConfig(train=f"images:{root}", in_memory=False, val_split=0, test_split=0, normalize=False))
    task = SupervisedTask(data, batch_size=36, seed=0, loss="auto", label_smoothing=0.0, metrics=[], num_workers=1)
    with pytest.raises(ZerotuneError) as e:
        task.batch(0)
    message = str(e.value)
    assert "03.png" in message and "cannot read the image" in message and "\n" not in message
