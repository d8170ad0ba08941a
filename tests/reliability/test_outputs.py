"""The one output rule: no verb writes over, or removes, anything it was not told to replace.

An existing output needs --overwrite; --overwrite replaces only the same kind of output (a run,
a shard folder, an export, a tokenizer file) and never one that is, holds or lies inside the
command's inputs; finished artifacts are built beside their place and swapped in at the end, so
a failure leaves an earlier one as it was. Every case checks the protected folders byte for byte.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import tiny_config
from tests.reliability.common import snapshot
from zerotune.cli import main
from zerotune.train.api import train


def one_line_exit(capsys, argv: list[str], code: int, *fragments: str) -> None:
    """``argv`` exits with ``code`` and one error line holding ``fragments`` (a progress bar aside)."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    return train(tiny_config(epochs=1), out=root / "run", log=lambda *a: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("".join(f"the cat sat on mat number {i}\n\n" for i in range(60)))
    return path


def test_predict_never_writes_over_the_runs_weights(run, capsys, tmp_path):
    before = snapshot(run)
    one_line_exit(capsys, ["predict", run, "--input", "builtin:digits", "--output", run / "model.safetensors"], 2,
                  "model.safetensors: is an input of this command")
    one_line_exit(capsys, ["predict", run, "--input", "builtin:digits", "--output", run / "model.safetensors",
                           "--overwrite"], 2, "is an input of this command")
    assert snapshot(run) == before
    out = tmp_path / "p.csv"
    out.write_text("mine")
    one_line_exit(capsys, ["predict", run, "--input", "builtin:digits", "--output", out], 2,
                  "p.csv: already exists; pass --overwrite")
    assert out.read_text() == "mine"
    assert main(["predict", str(run), "--input", "builtin:digits", "--output", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("id,prediction,probability")


def test_evaluate_keeps_an_earlier_evaluation_unless_told(run, capsys, tmp_path):
    """A second evaluation (other data, another split) does not replace the first without
    --overwrite; --output puts it elsewhere, its plot beside it; never onto the run's model."""
    import json
    import shutil

    source = tmp_path / "run"
    shutil.copytree(run, source)
    assert main(["evaluate", str(source)]) == 0
    first = snapshot(source)
    one_line_exit(capsys, ["evaluate", source, "--split", "val"], 2, "eval.json: already exists; pass --overwrite")
    one_line_exit(capsys, ["evaluate", source, "--output", source / "model.safetensors", "--overwrite"], 2,
                  "model.safetensors: is an input of this command")
    assert snapshot(source) == first
    assert main(["evaluate", str(source), "--split", "val", "--output", str(tmp_path / "val.json")]) == 0
    assert json.loads((tmp_path / "val.json").read_text())["split"] == "val"
    assert (tmp_path / "val_confusion_matrix.png").stat().st_size > 0 and snapshot(source) == first
    assert main(["evaluate", str(source), "--split", "val", "--overwrite"]) == 0
    assert json.loads((source / "eval.json").read_text())["split"] == "val"


def test_prepare_never_writes_into_a_folder_that_is_not_a_shard_folder(run, corpus, capsys, tmp_path):
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", f"text:{corpus}", "--vocab-size", "300", "--kind", "char",
                 "--out", str(tok)]) == 0
    before = snapshot(run)
    for extra in ([], ["--overwrite"]):
        one_line_exit(capsys, ["prepare", "--input", f"text:{corpus}", "--tokenizer", tok, "--out", run, *extra], 2,
                      "holds files and is not a shard folder")
    assert snapshot(run) == before
    shards = tmp_path / "shards"
    assert main(["prepare", "--input", f"text:{corpus}", "--tokenizer", str(tok), "--out", str(shards)]) == 0
    one_line_exit(capsys, ["prepare", "--input", f"text:{corpus}", "--tokenizer", tok, "--out", shards], 2,
                  "shard folder already exists; pass --overwrite")
    one_line_exit(capsys, ["prepare", "--input", f"text:{corpus}", "--tokenizer", shards, "--out", shards,
                           "--overwrite"], 2, "holds or lies inside an input")  # its own tokenizer is an input
    done = snapshot(shards)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    one_line_exit(capsys, ["prepare", "--input", f"jsonl:{bad}", "--tokenizer", tok, "--out", shards, "--overwrite"],
                  2, "bad.jsonl: line 2")
    assert snapshot(shards) == done  # the failed run left the finished shards as they were
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "shards", "tok"]  # nothing half-written


def test_export_never_removes_the_run_it_reads(run, capsys, tmp_path):
    before = snapshot(run)
    for fmt in ("safetensors", "hf"):
        one_line_exit(capsys, ["export", run, "--format", fmt, "--out", run, "--overwrite"], 2,
                      "is, holds or lies inside an input of this command")
        one_line_exit(capsys, ["export", run, "--format", fmt, "--out", run.parent, "--overwrite"], 2,
                      "is, holds or lies inside an input of this command")
    assert snapshot(run) == before


def test_a_failed_export_leaves_the_earlier_one_as_it_was(run, capsys, tmp_path, monkeypatch):
    from zerotune.interop import export

    out = tmp_path / "exp"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    earlier = snapshot(out)

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "copy_file", full)
    one_line_exit(capsys, ["export", run, "--format", "safetensors", "--out", out, "--overwrite"], 1,
                  "No space left on device")
    assert snapshot(out) == earlier and sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


@pytest.mark.parametrize("verb", [["prune", "--amount", "0.5"], ["quantize"]])
def test_compression_never_removes_its_source_or_a_folder_of_other_files(verb, run, capsys, tmp_path):
    before = snapshot(run)
    one_line_exit(capsys, [verb[0], run, *verb[1:], "--out", run.parent, "--overwrite"], 2,
                  "is, holds or lies inside an input of this command")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    one_line_exit(capsys, [verb[0], run, *verb[1:], "--out", mine, "--overwrite"], 2, "is not a run folder")
    assert snapshot(run) == before and (mine / "notes.txt").read_text() == "keep"


def test_training_runs_never_land_in_their_data_or_source(run, capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data / "d.npz", x=rng.normal(size=(40, 3)).astype(np.float32), y=np.arange(40) % 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{train: 'arrays:{data / 'd.npz'}'}}\ntrain: {{epochs: 1, progress: false}}\n")
    before = snapshot(data)
    for out in (data, data / "d.npz", tmp_path):
        one_line_exit(capsys, ["train", cfg, "--out", out, "--overwrite"], 2, "lies inside an input of this command")
    assert snapshot(data) == before
    source = snapshot(run)
    digits = tmp_path / "digits.yaml"
    digits.write_text(yaml.safe_dump(tiny_config(epochs=1)))
    for out in (run, run.parent, run / "ft"):
        one_line_exit(capsys, ["finetune", digits, "--from", run, "--out", out, "--overwrite"], 2,
                      "is, holds or lies inside an input of this command")
    assert snapshot(run) == source


def test_tokenizer_train_never_replaces_a_runs_tokenizer(corpus, capsys, tmp_path):
    run = tmp_path / "textrun"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "tokenizer.json").write_text("{}")
    before = snapshot(run)
    one_line_exit(capsys, ["tokenizer", "train", "--input", f"text:{corpus}", "--vocab-size", "300", "--kind", "char",
                           "--out", run, "--overwrite"], 2, "holds a run or token shards")
    one_line_exit(capsys, ["tokenizer", "train", "--input", f"text:{corpus.parent}", "--vocab-size", "300",
                           "--kind", "char", "--out", corpus.parent], 2, "is an input of this command")
    assert snapshot(run) == before


def full_disk(monkeypatch) -> None:
    """Every file written from here on fails as on a full disk, when it is flushed to the device."""
    from zerotune import files

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "fsync_file", full)


def no_temporary_files(*folders: Path) -> None:
    left = [p for f in folders for p in f.rglob("*") if ".tmp" in p.name or p.stat().st_size == 0 and p.is_file()]
    assert not left, left


@pytest.mark.parametrize("verb", ["prepare", "predict", "export-onnx", "export-safetensors", "evaluate", "prune",
                                  "quantize"])
def test_a_full_disk_is_one_line_naming_the_file_for_every_verb(verb, run, corpus, tmp_path, monkeypatch, capsys):
    """Exit 1, one line naming where the file was going, nothing half-written, the source untouched."""
    import shutil

    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", f"text:{corpus}", "--vocab-size", "300", "--kind", "char",
                 "--out", str(tok)]) == 0
    work, source = tmp_path / "work", tmp_path / "source"
    work.mkdir()
    shutil.copytree(run, source)
    argv, out = {
        "prepare": (["prepare", "--input", f"text:{corpus}", "--tokenizer", tok, "--out", work / "shards"],
                    work / "shards"),
        "predict": (["predict", source, "--input", "builtin:digits", "--output", work / "p.csv"], work / "p.csv"),
        "export-onnx": (["export", source, "--format", "onnx", "--out", work / "onnx"], work / "onnx"),
        "export-safetensors": (["export", source, "--format", "safetensors", "--out", work / "st"], work / "st"),
        "evaluate": (["evaluate", source], source / "plots" / "confusion_matrix.png"),  # the plot first
        "prune": (["prune", source, "--amount", "0.5", "--out", work / "pruned"], work / "pruned"),
        "quantize": (["quantize", source, "--out", work / "int8"], work / "int8"),
    }[verb]
    if verb == "export-onnx":
        pytest.importorskip("onnxscript")
    before = snapshot(source)
    full_disk(monkeypatch)
    one_line_exit(capsys, argv, 1, f"error: {out}", "No space left on device")
    no_temporary_files(work, source)
    assert not out.exists() and not (source / "eval.json").exists()
    if verb != "evaluate":  # the one verb that writes into the run (its eval.json and plot)
        assert snapshot(source) == before


def test_a_config_yaml_among_other_files_is_not_a_run(capsys, tmp_path):
    """--overwrite replaces a run folder, not a project folder that happens to hold a config.yaml."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("name: my app\n")
    (project / "main.py").write_text("print('hi')\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(epochs=1)))
    before = snapshot(project)
    one_line_exit(capsys, ["train", cfg, "--out", project, "--overwrite"], 2, "holds files and is not a run folder")
    assert snapshot(project) == before
