import os
import pickle
import struct

import numpy as np
import pytest
import torch

from zerotune.config import DataConfig
from zerotune.data.sources import load_source
from zerotune.data.splits import load_data
from zerotune.errors import ZerotuneError

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _batch(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, 10, size=n).tolist()


def _write(path, obj, protocol=2):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _write_cifar(root, n=4, bytes_keys=False, protocol=2):
    root.mkdir(parents=True, exist_ok=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data, labels = _batch(n, i)
        batches[name] = (data, labels)
        _write(root / name, {key("batch_label"): "b", key("data"): data, key("labels"): labels}, protocol)
    _write(
        root / "batches.meta", {key("label_names"): [key(c) for c in NAMES], key("num_vis"): 3072}, protocol
    )
    return batches


@pytest.mark.parametrize("protocol,bytes_keys", [(2, False), (2, True), (5, False)])
def test_cifar_batches(tmp_path, protocol, bytes_keys):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", bytes_keys=bytes_keys, protocol=protocol)
    src = load_source(f"cifar:{tmp_path}")  # the parent folder is found too
    data = np.concatenate([batches[f"data_batch_{j}"][0] for j in range(1, 6)])
    labels = sum((batches[f"data_batch_{j}"][1] for j in range(1, 6)), [])
    assert src.train.x.shape == (20, 3, 32, 32) and src.train.x.dtype == torch.float32
    # row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major
    torch.testing.assert_close(src.train.x[3, 1, 2, 5], torch.tensor(float(data[3, 1024 + 2 * 32 + 5])))
    torch.testing.assert_close(src.train.x.reshape(20, -1), torch.from_numpy(data).float(), rtol=0, atol=0)
    torch.testing.assert_close(src.train.y, torch.tensor(labels), rtol=0, atol=0)
    assert len(src.test) == 4 and src.info.classes == NAMES and src.info.input_shape == [3, 32, 32]


def test_cifar_through_load_data(tmp_path):
    _write_cifar(tmp_path, n=10)
    data = load_data(DataConfig(train=f"cifar:{tmp_path}", val_split=0.2), seed=1)
    assert len(data.train) == 40 and len(data.val) == 10 and len(data.test) == 10
    assert len(data.preprocess.x_mean) == 3  # per-channel statistics


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilExec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('x')",))


@pytest.mark.parametrize("evil", [_Evil, _EvilExec])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, evil):
    marker = tmp_path / "pwned"
    data, labels = _batch(2, 0)
    _write(tmp_path / "data_batch_1", {"data": data, "labels": labels, "x": evil(marker)})
    refused = r"data_batch_1: refusing to load (posix\.system|__builtin__\.exec)"
    with pytest.raises(ZerotuneError, match=refused):
        load_source(f"cifar:{tmp_path}")
    assert not marker.exists()
    pickle.loads((tmp_path / "data_batch_1").read_bytes())  # the payload is live: plain pickle runs it
    assert marker.exists()


def test_bad_batches(tmp_path):
    with pytest.raises(ZerotuneError, match=r"no data_batch_1"):
        load_source(f"cifar:{tmp_path}")
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(ZerotuneError, match=r"data_batch_1: not a readable CIFAR pickle"):
        load_source(f"cifar:{tmp_path}")
    _write(tmp_path / "data_batch_1", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    with pytest.raises(
        ZerotuneError, match=r"data_batch_1: data: expected a \(N, 3072\) array, got \[2, 100\]"
    ):
        load_source(f"cifar:{tmp_path}")
    _write(tmp_path / "data_batch_1", {"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(ZerotuneError, match=r"data_batch_1: labels: key missing"):
        load_source(f"cifar:{tmp_path}")
    _write(tmp_path / "data_batch_1", {"data": np.zeros((2, 3072), np.uint8), "labels": [0]})
    with pytest.raises(ZerotuneError, match=r"data_batch_1: labels: 1 labels for 2 images"):
        load_source(f"cifar:{tmp_path}")


def _py2_batch(data, labels):
    """A Python 2 protocol-2 pickle of {'data': uint8 array, 'labels': list}, written opcode by
    opcode the way the official CIFAR-10 files are (str keys and a str holding the pixels)."""

    def py2_str(text):  # SHORT_BINSTRING
        raw = text.encode("latin1")
        return b"U" + bytes([len(raw)]) + raw

    n, width = data.shape
    array = b"".join(
        [
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85",
            py2_str("b") + b"\x87R",  # _reconstruct(ndarray, (0,), 'b')
            b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", width) + b"\x86",  # version, shape
            b"cnumpy\ndtype\n" + py2_str("u1") + b"K\x00K\x01\x87R",
            b"(K\x03" + py2_str("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",  # dtype state
            b"\x89T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb",  # not Fortran, raw bytes
        ]
    )
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + py2_str("data") + array + py2_str("labels") + label_list + b"u."


def test_python2_pickles_like_the_official_files(tmp_path):
    data, labels = _batch(3, 9)
    (tmp_path / "data_batch_1").write_bytes(_py2_batch(data, labels))
    assert pickle.loads((tmp_path / "data_batch_1").read_bytes(), encoding="latin1")["labels"] == labels
    src = load_source(f"cifar:{tmp_path}")
    torch.testing.assert_close(src.train.x.reshape(3, -1), torch.from_numpy(data).float(), rtol=0, atol=0)
    assert (
        src.train.y.tolist() == labels
        and src.test is None
        and src.info.classes == [str(i) for i in range(10)]
    )
