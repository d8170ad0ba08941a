import numpy as np
import pytest
import torch
from PIL import Image

from zerotune.config import DataConfig
from zerotune.data.sources import load_source
from zerotune.data.splits import load_data
from zerotune.errors import ZerotuneError


def _grey(seed, h=6, w=5):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)


def test_greyscale_folder(tmp_path):
    a, b, c = _grey(0), _grey(1), _grey(2)
    (tmp_path / "zebra").mkdir()
    (tmp_path / "ant").mkdir()
    Image.fromarray(a).save(tmp_path / "zebra" / "1.png")
    Image.fromarray(b).save(tmp_path / "ant" / "1.bmp")
    Image.fromarray(c, mode="L").convert("P").save(tmp_path / "ant" / "2.gif")  # grey palette
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    src = load_source(f"images:{tmp_path}")
    assert src.info.classes == ["ant", "zebra"] and src.info.input_shape == [1, 6, 5]
    assert src.train.y.tolist() == [0, 0, 1]
    expected = torch.from_numpy(np.stack([b, c, a]).astype(np.float32)).unsqueeze(1)  # (3, 1, 6, 5)
    torch.testing.assert_close(src.train.x, expected, rtol=0, atol=0)


def test_rgb_and_resize(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    big = _grey(4, h=8, w=12)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    Image.fromarray(rgb).save(tmp_path / "a" / "x.png")
    Image.fromarray(big).save(tmp_path / "b" / "y.png")
    src = load_source(f"images:{tmp_path}")
    assert src.train.x.shape == (2, 3, 4, 6)  # RGB because one image has colour; size of the first
    torch.testing.assert_close(src.train.x[0], torch.from_numpy(rgb).permute(2, 0, 1).float(), rtol=0, atol=0)
    # the grey image is copied to all three channels and resized bilinearly to 6×4
    ref = np.asarray(
        Image.fromarray(big).convert("RGB").resize((6, 4), Image.Resampling.BILINEAR), np.float32
    )
    torch.testing.assert_close(src.train.x[1], torch.from_numpy(ref).permute(2, 0, 1), rtol=0, atol=0)
    assert torch.equal(src.train.x[1, 0], src.train.x[1, 2])


def test_constant_image_stays_constant_when_resized(tmp_path):
    (tmp_path / "c").mkdir()
    Image.fromarray(np.full((5, 5), 77, np.uint8)).save(tmp_path / "c" / "1.png")
    Image.fromarray(np.full((13, 9), 200, np.uint8)).save(tmp_path / "c" / "2.png")
    x = load_source(f"images:{tmp_path}").train.x
    torch.testing.assert_close(x[1], torch.full((1, 5, 5), 200.0), rtol=0, atol=0)


def test_load_data_through_images(tmp_path):
    for k in range(2):
        (tmp_path / str(k)).mkdir()
        for i in range(5):
            Image.fromarray(_grey(10 * k + i, 4, 4)).save(tmp_path / str(k) / f"{i}.png")
    data = load_data(DataConfig(train=f"images:{tmp_path}", val_split=0.2, test_split=0.2), seed=0)
    assert len(data.train) + len(data.val) + len(data.test) == 10
    assert data.train.x.shape[1:] == (1, 4, 4)


def test_errors(tmp_path):
    with pytest.raises(ZerotuneError, match=r"nope: image folder not found"):
        load_source(f"images:{tmp_path / 'nope'}")
    with pytest.raises(ZerotuneError, match=r"no class sub-folders"):
        load_source(f"images:{tmp_path}")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.txt").write_text("x")
    with pytest.raises(ZerotuneError, match=r"no images \(.bmp, .gif, .jpeg, .jpg, .png\)"):
        load_source(f"images:{tmp_path}")
    (tmp_path / "cls" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ZerotuneError, match=r"cls/broken.png: cannot read the image"):
        load_source(f"images:{tmp_path}")


def test_sixteen_bit_greyscale_is_scaled(tmp_path):
    (tmp_path / "c").mkdir()
    wide = np.array([[0, 257, 65535], [514, 1028, 32896]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "c" / "w.png")
    x = load_source(f"images:{tmp_path}").train.x
    torch.testing.assert_close(x[0, 0], torch.tensor([[0.0, 1.0, 255.0], [2.0, 4.0, 128.0]]), rtol=0, atol=0)
