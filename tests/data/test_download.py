import functools
import hashlib
import http.server
import io
import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest

from tests.helpers import write_digits_idx
from zerotune.data import download as dl
from zerotune.data.sources import load_source
from zerotune.errors import ZerotuneError


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server in a thread serving tmp_path/www; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/files"
    httpd.shutdown()
    httpd.server_close()


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _patch(monkeypatch, name, folder, names):
    ds = dl.DATASETS[name]
    files = tuple((n, _md5(folder / n)) for n in names)
    monkeypatch.setitem(dl.DATASETS, name, dl.Dataset("http://unused.invalid/", files, ds.spec, ds.extract))
    return files


def test_real_checksums_are_recorded():
    assert (
        dict(dl.DATASETS["mnist"].files)["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    )
    assert dict(dl.DATASETS["cifar10"].files)["cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"
    assert all(len(md5) == 32 for ds in dl.DATASETS.values() for _, md5 in ds.files)


def test_download_mnist_from_mirror(tmp_path, server, monkeypatch):
    www, url = server
    write_digits_idx(www / "files")
    _patch(monkeypatch, "mnist", www / "files", dl.IDX_NAMES)
    dest = tmp_path / "data" / "mnist"
    paths = dl.download("mnist", dest, mirror=url)
    assert [p.name for p in paths] == dl.IDX_NAMES
    assert all(p.read_bytes() == (www / "files" / p.name).read_bytes() for p in paths)
    assert sorted(f.name for f in dest.iterdir()) == sorted(dl.IDX_NAMES)  # no temp files left
    src = load_source(f"idx:{dest}")
    assert len(src.train) == 1500 and len(src.test) == 297


def test_mirror_from_environment_and_no_second_download(tmp_path, server, monkeypatch):
    www, url = server
    write_digits_idx(www / "files")
    _patch(monkeypatch, "fashion-mnist", www / "files", dl.IDX_NAMES)
    monkeypatch.setenv(dl.MIRROR_ENV, url)
    dl.download("fashion-mnist", tmp_path / "f")
    monkeypatch.setenv(dl.MIRROR_ENV, "http://127.0.0.1:9/nothing")  # unreachable, but nothing to fetch
    assert len(dl.download("fashion-mnist", tmp_path / "f")) == 4


def test_checksum_mismatch_deletes_the_download(tmp_path, server, monkeypatch):
    www, url = server
    (www / "files").mkdir()
    (www / "files" / "cifar-10-python.tar.gz").write_bytes(b"corrupted")
    monkeypatch.setitem(
        dl.DATASETS, "cifar10", dl.Dataset("x", (("cifar-10-python.tar.gz", "0" * 32),), "cifar:{dest}", True)
    )
    got = hashlib.md5(b"corrupted").hexdigest()
    with pytest.raises(
        ZerotuneError, match=rf"cifar-10-python.tar.gz: checksum mismatch: expected md5 0{{32}}, got {got}"
    ):
        dl.download("cifar10", tmp_path / "c", mirror=url)
    assert list((tmp_path / "c").iterdir()) == []


def test_no_server_is_one_clean_error(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        ZerotuneError,
        match=rf"could not reach http://127.0.0.1:{port}/train-images-idx3-ubyte.gz .*put it at",
    ):
        dl.download("mnist", tmp_path / "m", mirror=f"http://127.0.0.1:{port}")
    assert list((tmp_path / "m").iterdir()) == []
    with pytest.raises(ZerotuneError, match=r"unknown data set 'imagenet'"):
        dl.download("imagenet", tmp_path)


def _cifar_tar(path, extra=None):
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = np.full((2, 3072), 7, np.uint8)
            blob = pickle.dumps({"data": data, "labels": [1, 2]}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        if extra:
            info = tarfile.TarInfo(extra)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))


def test_download_cifar_extracts_for_the_loader(tmp_path, server, monkeypatch):
    www, url = server
    (www / "files").mkdir()
    _cifar_tar(www / "files" / "cifar-10-python.tar.gz")
    _patch(monkeypatch, "cifar10", www / "files", ["cifar-10-python.tar.gz"])
    paths = dl.download("cifar10", tmp_path / "c", mirror=url)
    assert sorted(p.name for p in paths)[:2] == ["data_batch_1", "data_batch_2"] and all(
        p.is_file() for p in paths
    )
    src = load_source(f"cifar:{tmp_path / 'c'}")
    assert src.train.x.shape == (10, 3, 32, 32) and float(src.train.x.mean()) == 7.0


def test_archive_escaping_the_folder_is_refused(tmp_path, server, monkeypatch):
    www, url = server
    (www / "files").mkdir()
    _cifar_tar(www / "files" / "cifar-10-python.tar.gz", extra="../escaped.txt")
    _patch(monkeypatch, "cifar10", www / "files", ["cifar-10-python.tar.gz"])
    with pytest.raises(ZerotuneError, match=r"cifar-10-python.tar.gz: cannot extract the archive"):
        dl.download("cifar10", tmp_path / "c", mirror=url)
    assert not (tmp_path / "escaped.txt").exists()



def test_a_different_file_of_the_same_name_is_kept_unless_told(tmp_path, server, monkeypatch, capsys):
    """A file in DEST with the name of a data set's file but another checksum (the user's own, a
    damaged copy) is refused before anything is fetched; --overwrite downloads it again."""
    from zerotune.cli import main

    www, url = server
    write_digits_idx(www / "files")
    _patch(monkeypatch, "mnist", www / "files", dl.IDX_NAMES)
    dest = tmp_path / "mnist"
    dest.mkdir()
    (dest / dl.IDX_NAMES[2]).write_bytes(b"mine")
    assert main(["data", "download", "mnist", str(dest), "--mirror", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{dest / dl.IDX_NAMES[2]}: exists and is not the published file" in err[0]
    assert "pass --overwrite" in err[0]
    assert [p.name for p in dest.iterdir()] == [dl.IDX_NAMES[2]] and (dest / dl.IDX_NAMES[2]).read_bytes() == b"mine"
    assert main(["data", "download", "mnist", str(dest), "--mirror", url, "--overwrite"]) == 0
    assert all((dest / n).read_bytes() == (www / "files" / n).read_bytes() for n in dl.IDX_NAMES)
