"""predict on real files: image files, folders, globs and data specs; ids, top-k, true labels, JSONL.

The reference is the run's model applied by hand (plain PyTorch) to the same pixels, normalised
with the run's statistics."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import digits_uint8
from zerotune.cli import main
from zerotune.errors import ZerotuneError
from zerotune.evaluate.predict import predict
from zerotune.load import load_run
from zerotune.train.api import train


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A small CNN trained on 8×8 digit PNGs of classes 0, 1 and 2 (images:DIR, one folder a class)."""
    root = tmp_path_factory.mktemp("predict")
    images, labels = digits_uint8(8)
    for c in "012":
        (root / "img" / c).mkdir(parents=True)
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        if y < 3:
            Image.fromarray(im).save(root / "img" / str(y) / f"{i:04d}.png")
    run = train({"seed": 0, "data": {"train": f"images:{root / 'img'}", "test_split": 0.2},
                 "model": {"arch": "cnn", "channels": [8, 16]}, "optim": {"name": "adam", "lr": 0.01},
                 "train": {"epochs": 4, "batch_size": 32, "progress": False}}, out=root / "run", log=lambda *a: None)
    return root, run


def by_hand(run, files) -> torch.Tensor:
    """Class probabilities of ``files`` from the run's model: the PNG pixels (grey, 0..255),
    normalised with the run's mean and std."""
    loaded = load_run(run)
    x = torch.tensor(np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.float32) for f in files]))[:, None]
    mean, std = loaded.preprocess.x_mean[0], loaded.preprocess.x_std[0]
    with torch.no_grad():
        return loaded.model((x - mean) / std).softmax(-1)


def test_image_files_give_one_row_each_named_by_the_file(image_run, tmp_path):
    root, run = image_run
    files = sorted((root / "img" / "2").glob("*.png"))[:5]
    rows = list(csv.DictReader(open(predict(run, [str(f) for f in files], tmp_path / "p.csv", top_k=3))))
    probs = by_hand(run, files)
    classes = load_run(run).info.classes
    assert [r["id"] for r in rows] == [str(f) for f in files]
    assert list(rows[0]) == ["id", "prediction", "probability", "prediction_2", "probability_2", "prediction_3",
                             "probability_3"]  # no label: single files carry none
    for r, p in zip(rows, probs, strict=True):
        order = p.argsort(descending=True).tolist()
        assert [r["prediction"], r["prediction_2"], r["prediction_3"]] == [classes[i] for i in order]
        assert [float(r["probability"]), float(r["probability_2"]), float(r["probability_3"])] == pytest.approx(
            sorted(p.tolist(), reverse=True), abs=1e-6)


def test_a_folder_of_class_folders_a_glob_and_jsonl(image_run, tmp_path):
    root, run = image_run
    out = predict(run, str(root / "img"), tmp_path / "p.jsonl", top_k=2)  # the format from the suffix
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    n = sum(1 for _ in (root / "img").rglob("*.png"))
    assert len(rows) == n and {r["label"] for r in rows} == {"0", "1", "2"}
    assert all(r["label"] == r["id"].split("/")[-2] for r in rows)  # the true label is the folder's name
    assert sum(r["label"] == r["prediction"] for r in rows) / n > 0.9
    assert all(len(r["top_k"]) == 2 and r["top_k"][0] == [r["prediction"], r["probability"]] for r in rows)
    spec_rows = [json.loads(line) for line in predict(run, f"images:{root / 'img'}", tmp_path / "s.jsonl",
                                                         top_k=2).read_text().splitlines()]
    assert spec_rows == rows  # the data spec names its rows by their files too
    glob_rows = list(csv.DictReader(open(predict(run, str(root / "img" / "1" / "*.png"), tmp_path / "g.csv"))))
    ones = [r for r in rows if r["label"] == "1"]
    assert [r["id"] for r in glob_rows] == [r["id"] for r in ones]
    assert [r["prediction"] for r in glob_rows] == [r["prediction"] for r in ones]


def test_images_of_another_size_or_colour_are_converted_like_the_training_ones(image_run, tmp_path):
    root, run = image_run
    f = sorted((root / "img" / "0").glob("*.png"))[0]
    Image.open(f).convert("RGB").save(tmp_path / "rgb.png")  # three equal channels → the same grey
    Image.open(f).resize((16, 16), Image.Resampling.NEAREST).save(tmp_path / "big.png")  # → 8×8 again
    rows = list(csv.DictReader(open(predict(run, [str(f), str(tmp_path / "rgb.png"), str(tmp_path / "big.png")],
                                            tmp_path / "p.csv"))))
    assert rows[0]["probability"] == rows[1]["probability"]
    assert rows[2]["prediction"] == rows[0]["prediction"]


def test_bad_inputs_are_one_line(image_run, tmp_path, capsys):
    root, run = image_run
    png = str(sorted((root / "img" / "0").glob("*.png"))[0])
    (tmp_path / "t.csv").write_text("a,label\n1,0\n")
    for argv, fragment in [
        (["--input", png, "--top-k", "4"], "--top-k: expected 1 to 3, the number of classes, got 4"),
        (["--input", png, str(tmp_path / "t.csv")], "several inputs must all be image files"),
        (["--input", str(tmp_path / "none.png")], "none.png: file not found"),
        (["--input", str(tmp_path / "*.png")], "the pattern matches no file"),
        (["--input", str(tmp_path / "t.csv")], "t.csv: examples have shape [1], the model expects [1, 8, 8]"),
    ]:
        capsys.readouterr()
        assert main(["predict", str(run), *argv, "--output", str(tmp_path / "out.csv")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out.csv").exists()
    with pytest.raises(ZerotuneError, match="--format: expected csv or jsonl"):
        predict(run, png, tmp_path / "x.txt", format="xml")
