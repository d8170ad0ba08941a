"""Bad input anywhere on the command line: exit 2 and exactly one line on stderr, nothing
overwritten; a full disk: exit 1, one line, every earlier checkpoint intact and resumable."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import tiny_config
from tests.reliability.common import (
    ZT,
    assert_same_final_weights,
    assert_same_metrics,
    env,
    run_config,
    write_config,
)
from zerotune import files as zfiles
from zerotune.cli import main
from zerotune.train import checkpoint as ckpt
from zerotune.train import loop


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference_run):
    """A config, a finished run, an unfinished run, a tokenizer folder, a text file, a non-run folder."""
    d = tmp_path_factory.mktemp("files")
    write_config(d / "c.yaml", tiny_config(epochs=1))
    (d / "tagged.yaml").write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "bad.yaml").write_text("seed: [1, 2\n")
    shutil.copytree(reference_run, d / "run", ignore=shutil.ignore_patterns("tb", "plots"))
    shutil.copytree(d / "run", d / "unfinished")
    (d / "unfinished" / "model.json").unlink()
    (d / "plain").mkdir()
    (d / "plain" / "notes.txt").write_text("not a run")
    (d / "a.txt").write_text("some text to learn from\n" * 20)
    (d / "bad.csv").write_text("a,label\n1,2,3\n")
    from zerotune.data.tokenizer import train_tokenizer

    train_tokenizer(f"text:{d / 'a.txt'}", 300, d / "tok", progress=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    np.savez(d / "oneclass.npz", x=x, y=np.zeros(30, np.int64))
    np.savez(d / "nan.npz", x=np.where(np.arange(120).reshape(30, 4) == 57, np.nan, x), y=np.arange(30) % 2)
    np.savez(d / "y2d.npz", x=x, y=np.zeros((30, 2), np.int64))
    np.savez(d / "nofeatures.npz", x=np.zeros((30, 0), np.float32), y=np.arange(30) % 2)
    np.savez(d / "floatlabels.npz", x=rng.normal(size=(30, 1, 8, 8)).astype(np.float32), y=rng.normal(size=30))
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    levels = "abcdefg"  # each list holds ten of the one before: 10**7 values once expanded
    (d / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{k}: &{k} [{', '.join([f'*{p}'] * 10)}]\n" for p, k in zip(levels, levels[1:], strict=False)))
    (d / "deep.yaml").write_text("seed: " + "[" * 200 + "]" * 200 + "\n")
    shutil.copytree(d / "run", d / "badshape")
    meta = json.loads((d / "badshape" / "model.json").read_text())
    meta["data_info"]["input_shape"] = [0, 8, 8]
    (d / "badshape" / "model.json").write_text(json.dumps(meta))
    shutil.copytree(d / "run", d / "huge")  # sizes the weights do not have: refused before they are allocated
    meta = json.loads((d / "huge" / "model.json").read_text())
    meta["model"]["hidden"] = [2**36]
    (d / "huge" / "model.json").write_text(json.dumps(meta))
    return d


# (arguments, fragments the one line must contain); {d} is the files fixture's folder
CASES = [
    (["trian"], ["invalid choice: 'trian'"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["demo", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["demo", "--out"], ["--out: expected one argument"]),
    (["train"], ["give a CONFIG file, or --resume RUN"]),
    (["train", "{d}/missing.yaml"], ["missing.yaml: file not found"]),
    (["train", "{d}"], [": not a file"]),
    (["train", "{d}/a.txt"], ["a.txt: expected a YAML mapping at the top level, got str"]),
    (["train", "{d}/list.yaml"], ["list.yaml: expected a YAML mapping at the top level, got list"]),
    (["train", "{d}/bad.yaml"], ["bad.yaml: line 2: invalid YAML"]),
    (["train", "{d}/tagged.yaml"], ["tagged.yaml: line 1: invalid YAML: could not determine a constructor"]),
    (["train", "{d}/c.yaml", "--set", "train.epochs"], ["expected KEY=VALUE"]),
    (["train", "{d}/c.yaml", "--set", "train.epochs=0"], ["train.epochs: input should be greater than or equal to 1"]),
    (["train", "{d}/c.yaml", "--set", "train.nope=1"], ["train.nope: unknown key"]),
    (["train", "{d}/c.yaml", "--set", "seed.x=1"], ["--set seed.x: seed is not a mapping"]),
    (["train", "{d}/c.yaml", "--set", "model.arch=nosuch"], ["model.arch: unknown arch 'nosuch'"]),
    (["train", "{d}/c.yaml", "--set", "data.train=nosuch:x"], ["data spec 'nosuch:x': expected KIND:ARG"]),
    (["train", "{d}/c.yaml", "--set", "data.train=idx:{d}/nothing"], ["nothing: IDX folder not found"]),
    (["train", "{d}/c.yaml", "--set", "data.train=csv:{d}/bad.csv"], ["bad.csv: line 2: 3 fields"]),
    (["train", "{d}/c.yaml", "--set", "data.in_memory=maybe"], ["data.in_memory: expected one of 'auto', True or"]),
    (["train", "{d}/c.yaml", "--set", "data.num_workers=-1"], ["data.num_workers: input should be greater than or"]),
    (["train", "{d}/c.yaml", "--set", "seed=-1"], ["seed: input should be greater than or equal to 0"]),
    (["train", "{d}/c.yaml", "--set", "train.device=mps"], ["train.device: mps was asked for but no Apple GPU"]),
    (["train", "{d}/c.yaml", "--set", "seed=123456789012345678901234"], ["seed: input should be less than 4294967296"]),
    (["train", "{d}/c.yaml", "--set", "optim.betas=[0.9,1.5]"], ["optim.betas: each beta must be in [0, 1)"]),
    (["train", "{d}/c.yaml", "--set", "optim.betas=[.nan,0.9]"], ["optim.betas: each beta must be in [0, 1)"]),
    (["train", "{d}/c.yaml", "--set", "train.metrics=[top0_accuracy]"], ["unknown metric 'top0_accuracy'"]),
    (["train", "{d}/c.yaml", "--set", "model.hidden=[100000000000]"], ["model: 7,500,000,000,010 parameters need "
                                                                          "about", "GiB for weights, gradients"]),
    (["train", "{d}/c.yaml", "--set", "data.train=arrays:{d}/oneclass.npz"], ["a classifier needs two classes"]),
    (["train", "{d}/c.yaml", "--set", "data.train=arrays:{d}/nan.npz"], ["nan.npz: x holds NaN, an infinity or a "
                                                                          "value beyond float32 (first in row 14)"]),
    (["train", "{d}/c.yaml", "--set", "data.train=arrays:{d}/y2d.npz"], ["y2d.npz: y must hold one label or target"]),
    (["train", "{d}/c.yaml", "--set", "data.train=arrays:{d}/nofeatures.npz"], ["nofeatures.npz: x has no features"]),
    (["train", "{d}/bomb.yaml"], ["bomb.yaml: expands to more than 100,000 values"]),
    (["train", "{d}/deep.yaml"], ["deep.yaml: nested deeper than 50 levels"]),
    (["train", "{d}/c.yaml", "--set", "data=" + "[" * 100 + "]" * 100], ["--set data: nested deeper than 50 levels"]),
    (["evaluate", "{d}/run", "--data", "arrays:{d}/floatlabels.npz"], ["its labels are real numbers, but the model "
                                                                        "is a classifier"]),
    (["evaluate", "{d}/badshape"], ["model.json: data_info: input_shape: expected sizes from 1"]),
    (["evaluate", "{d}/huge"], ["model.safetensors: tensor 'net.1.weight' has shape",
                                "the model expects (68719476736,"]),
    (["generate", "{d}/run", "--prompt", "x", "--temperature", "nan"], ["temperature: expected a finite number"]),
    (["generate", "{d}/run", "--prompt", "x", "--top-p", "inf"], ["top_p: expected a number in (0, 1]"]),
    (["generate", "{d}/run", "--prompt", "x", "--seed", "-3"], ["--seed: expected a whole number from 0"]),
    (["generate", "{d}/run", "--prompts", "{d}/latin1.txt"], ["latin1.txt: not UTF-8 text"]),
    (["inspect", "{d}/c.yaml", "--batch-size", "0"], ["--batch-size: expected a whole number from 1"]),
    (["prepare", "--input", "text:{d}/a.txt", "--tokenizer", "{d}/tok", "--out", "{d}/sh", "--seed", "-1"],
     ["--seed: expected a whole number from 0"]),
    (["train", "{d}/c.yaml", "--out", "{d}/a.txt"], ["a.txt: exists and is not a folder"]),
    (["train", "{d}/c.yaml", "--out", "{d}/plain"], ["plain: holds files and is not a run folder"]),
    (["train", "{d}/c.yaml", "--out", "{d}/plain", "--overwrite"], ["plain: holds files and is not a run folder"]),
    (["train", "--resume", "{d}/nothing"], ["nothing: run folder not found"]),
    (["train", "--resume", "{d}/plain"], ["plain: not a run folder (config.yaml is missing)"]),
    (["train", "--resume", "{d}/run", "--set", "seed=1"], ["--resume continues a run with its own config.yaml"]),
    (["evaluate"], ["the following arguments are required: run"]),
    (["evaluate", "{d}/nothing"], ["nothing: run folder not found"]),
    (["evaluate", "{d}/plain"], ["not a run folder"]),
    (["evaluate", "{d}/unfinished"], ["unfinished: run has no final model yet (model.json missing)"]),
    (["evaluate", "{d}/run", "--split", "dev"], ["argument --split: invalid choice: 'dev'"]),
    (["evaluate", "{d}/run", "--data", "csv:{d}/missing.csv"], ["missing.csv: file not found"]),
    (["evaluate", "{d}/run", "--data", "builtin:diabetes"], ["examples have shape [10], the model expects [1, 8, 8]"]),
    (["predict", "{d}/run"], ["the following arguments are required: --input"]),
    (["predict", "{d}/run", "--input", "{d}/missing.csv"], ["missing.csv"]),
    (["data"], ["the following arguments are required: ACTION"]),
    (["data", "download", "imagenet", "{d}/dl"], ["argument name: invalid choice: 'imagenet'"]),
    (["data", "download", "mnist"], ["the following arguments are required: dest"]),
    (["data", "download", "mnist", "{d}/dl", "--mirror", "http://127.0.0.1:9/"], ["127.0.0.1:9"]),
    (["tokenizer"], ["the following arguments are required: ACTION"]),
    (["tokenizer", "train", "--input", "text:{d}/a.txt", "--out", "{d}/t2"], ["--vocab-size"]),
    (["tokenizer", "train", "--input", "text:{d}/a.txt", "--vocab-size", "ten", "--out", "{d}/t2"],
     ["argument --vocab-size: expected a whole number, got 'ten'"]),
    (["tokenizer", "train", "--input", "text:{d}/a.txt", "--vocab-size", "20", "--out", "{d}/t2"],
     ["vocab_size 20 is too small for a bytelevel-bpe tokenizer"]),
    (["tokenizer", "train", "--input", "text:{d}/missing.txt", "--vocab-size", "300", "--out", "{d}/t2"],
     ["missing.txt"]),
    (["tokenizer", "train", "--input", "text:{d}/a.txt", "--vocab-size", "300", "--out", "{d}/t2", "--kind", "x"],
     ["argument --kind: invalid choice: 'x'"]),
    (["tokenizer", "train", "--input", "text:{d}/a.txt", "--vocab-size", "300", "--out", "{d}/tok"],
     ["tokenizer.json: already exists; pass --overwrite"]),
    (["prepare", "--input", "text:{d}/a.txt", "--out", "{d}/sh"], ["--tokenizer"]),
    (["prepare", "--input", "text:{d}/a.txt", "--tokenizer", "{d}/nothing", "--out", "{d}/sh"],
     ["tokenizer file not found"]),
    (["prepare", "--input", "text:{d}/a.txt", "--tokenizer", "{d}/a.txt", "--out", "{d}/sh"],
     ["a.txt: not a tokenizer.json"]),
    (["prepare", "--input", "text:{d}/a.txt", "--tokenizer", "{d}/tok", "--out", "{d}/sh", "--val-fraction", "2"],
     ["val_fraction must be in [0, 1), got 2.0"]),
    (["prepare", "--input", "nosuch:x", "--tokenizer", "{d}/tok", "--out", "{d}/sh"], ["text spec 'nosuch:x'"]),
]


def fill(args: list[str], d: Path) -> list[str]:
    return [a.replace("{d}", str(d)) for a in args]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, fragments", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(files, capfd, args, fragments):
    before = snapshot(files)
    code = main(fill(args, files))
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for f in fragments:
        assert fill([f], files)[0] in lines[0], lines[0]
    assert "Traceback" not in out + err
    after = snapshot(files)
    created = sorted(set(after) - set(before))
    assert created in ([], ["dl/.partial"]) or all(c.startswith("dl/") for c in created), created
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten


# One case per verb in a fresh interpreter: importing optional libraries on the error path
# (tokenizers, sklearn, tensorboard, matplotlib ...) must not print anything to stderr either.
FRESH = [
    ["trian"],
    ["demo", "--out"],
    ["train", "{d}/tagged.yaml"],
    ["train", "{d}/c.yaml", "--set", "data.train=idx:{d}/nothing"],
    ["evaluate", "{d}/run", "--data", "csv:{d}/missing.csv"],
    ["predict", "{d}/run"],
    ["data", "download", "mnist", "{d}/dl", "--mirror", "http://127.0.0.1:9/"],
    ["tokenizer", "train", "--input", "text:{d}/a.txt", "--vocab-size", "20", "--out", "{d}/t2"],
    ["prepare", "--input", "text:{d}/a.txt", "--tokenizer", "{d}/a.txt", "--out", "{d}/sh"],
]


def test_fresh_processes_print_exactly_one_line(files):
    procs = [subprocess.Popen([*ZT, *fill(args, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env()) for args in FRESH]
    for args, p in zip(FRESH, procs, strict=True):
        out, err = p.communicate(timeout=300)
        lines = err.splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)


def test_no_verb_is_one_line_and_exits_2(capfd):
    assert main([]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and "give a verb" in err


# ---------------------------------------------------------------- a full disk


def enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", None if path is None else str(path))


def no_leftovers(run: Path) -> None:
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_disk_full_while_checkpointing_keeps_old_checkpoints_and_resumes(tmp_path, monkeypatch, capfd,
                                                                        reference_run):
    config = write_config(tmp_path / "c.yaml", run_config())
    run = tmp_path / "run"
    real, calls = ckpt.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 9:  # the disk fills up after nine safetensors files (one of them best/)
            raise enospc(filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file)

    monkeypatch.setattr(zfiles, "save_file", save_file)
    assert main(["train", str(config), "--out", str(run)]) == 1
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot write the checkpoint (No space left on device)" in err[0], err
    assert str(run / "checkpoints") in err[0]
    steps = ckpt.step_checkpoints(run / "checkpoints")
    assert steps and all(ckpt.verify(s) is None for s in steps)
    assert ckpt.verify(run / "checkpoints" / "best") is None
    no_leftovers(run)
    assert not (run / "model.json").exists()
    monkeypatch.setattr(ckpt, "save_file", real)  # space freed: the run resumes and ends as if never stopped
    monkeypatch.setattr(zfiles, "save_file", real)
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_final_weights(run, reference_run)
    assert_same_metrics(run, reference_run)


def test_disk_full_while_logging_is_one_line_exit_1(tmp_path, monkeypatch, capfd):
    config = write_config(tmp_path / "c.yaml", run_config())
    metrics = tmp_path / "run" / "metrics.jsonl"

    def full_open(path, mode="r", *args, **kwargs):
        if Path(path) == metrics and mode == "a" and metrics.exists() and len(metrics.read_text().splitlines()) == 6:
            raise enospc()  # like a full disk, reported when the file is flushed: no file name
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(loop, "open", full_open, raising=False)
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 1
    err = capfd.readouterr().err.splitlines()
    assert err == [f"error: {metrics}: cannot write the file (No space left on device); files written before are kept"]
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-000006"


def test_safetensors_write_error_is_a_run_failure(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from zerotune.errors import RunFailed

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)

    monkeypatch.setattr(zfiles, "save_file", full)
    w = {"w": torch.zeros(2)}
    with pytest.raises(RunFailed, match=r"step-000001: cannot write the checkpoint \(Error while serializing: I/O err"):
        ckpt.save_checkpoint(tmp_path, "step-000001", w, {})
    with pytest.raises(RunFailed, match=r"m.safetensors: cannot write the file \(Error while serializing"):
        zfiles.save_weights(tmp_path / "m.safetensors", w)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 192 KiB tmpfs (needs root and a kernel that allows it; skipped otherwise)."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_really_full_disk(tmp_path, small_tmpfs, capfd, reference_run):
    cfg = run_config()
    cfg["train"]["keep_last"] = 3
    config = write_config(tmp_path / "c.yaml", cfg)
    run = small_tmpfs / "run"
    assert main(["train", str(config), "--out", str(run)]) == 1
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run}") and "No space left on device" in err[0], err
    last = ckpt.latest_checkpoint(run / "checkpoints")
    assert last is not None and ckpt.verify(last) is None
    shutil.copytree(run, tmp_path / "moved")  # to a disk with room, where it resumes exactly
    cfg_moved = yaml.safe_load((tmp_path / "moved" / "config.yaml").read_text())
    assert cfg_moved["train"]["keep_last"] == 3
    assert main(["train", "--resume", str(tmp_path / "moved")]) == 0
    assert_same_final_weights(tmp_path / "moved", reference_run)
