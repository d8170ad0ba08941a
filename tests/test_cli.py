import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_config

ZT = [sys.executable, "-m", "zerotune"]


def zt(*args, cwd=None):
    return subprocess.run([*ZT, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def one_line_error(p, *fragments):
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_config(epochs=1)))
    return p


@pytest.mark.parametrize("args, fragments", [
    (["trian"], ["invalid choice: 'trian'"]),
    (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["train", "missing.yaml"], ["missing.yaml: file not found"]),
    (["evaluate"], ["the following arguments are required: run"]),
    (["evaluate", "no-such-run"], ["no-such-run: run folder not found"]),
    (["predict", "x"], ["--input"]),
])
def test_bad_command_lines(args, fragments):
    one_line_error(zt(*args), *fragments)


def test_bad_config_value_and_set(tmp_path, cfg_file):
    one_line_error(zt("train", cfg_file, "--set", "train.epochs=five"), "train.epochs: expected an integer, got 'five'")
    one_line_error(zt("train", cfg_file, "--set", "train.epochs"), "expected KEY=VALUE")
    one_line_error(zt("train", cfg_file, "--set", "data.train=arrays:nope.npz"), "nope.npz: file not found")


def test_train_evaluate_predict_and_no_overwrite(tmp_path, cfg_file):
    run = tmp_path / "run"
    p = zt("train", cfg_file, "--out", run)
    assert p.returncode == 0, p.stderr
    p = zt("evaluate", run, "--json")
    result = json.loads(p.stdout)
    assert {"loss", "accuracy", "precision", "recall", "f1", "split", "n"} <= set(result)
    assert result == json.loads((run / "eval.json").read_text())
    assert (run / "plots" / "confusion_matrix.png").exists()
    before = (run / "model.safetensors").read_bytes()
    one_line_error(zt("train", cfg_file, "--out", run), "already exists", "--overwrite")
    assert (run / "model.safetensors").read_bytes() == before
    p = zt("predict", run, "--input", "builtin:digits", "--output", tmp_path / "pred.csv")
    assert p.returncode == 0, p.stderr
    rows = (tmp_path / "pred.csv").read_text().splitlines()
    assert rows[0] == "id,prediction,probability,label" and len(rows) == 1798
    one_line_error(zt("train", "--resume", run, "--set", "train.epochs=2"), "--resume")
    assert zt("train", "--resume", run).returncode == 0


def test_bad_data_does_not_touch_existing_run(tmp_path, cfg_file):
    run = tmp_path / "run"
    assert zt("train", cfg_file, "--out", run).returncode == 0
    before = sorted(p.name for p in run.rglob("*"))
    one_line_error(zt("train", cfg_file, "--out", run, "--overwrite", "--set", "data.train=builtin:nothing"),
                   "unknown builtin data set 'nothing'")
    assert sorted(p.name for p in run.rglob("*")) == before


def test_no_verb_is_one_line():
    one_line_error(zt(), "give a verb")


@pytest.mark.parametrize("verb", ["train", "finetune"])
@pytest.mark.parametrize("argv, passed", [
    (["--nproc", "2", "c.yaml", "--set", "train.epochs=1", "--set", "seed=3", "--out", "r", "--overwrite"],
     ["c.yaml", "--set", "train.epochs=1", "--set", "seed=3", "--out", "r", "--overwrite"]),
    (["c.yaml", "--nproc=2", "--out", "r"], ["c.yaml", "--out", "r"]),
    (["--npro", "2", "--resume", "r"], ["--resume", "r"]),  # a prefix argparse takes for --nproc
    (["c.yaml", "--out", "r", "--nproc", "2"], ["c.yaml", "--out", "r"]),
])
def test_nproc_relaunches_the_command_line_as_given(monkeypatch, verb, argv, passed):
    """Every argument reaches the torchrun workers as it was given; only --nproc goes (so a flag added
    to the parser later cannot be dropped)."""
    from zerotune import cli
    from zerotune.train import launch

    calls = []
    monkeypatch.setattr(launch, "launch", lambda nproc, args: calls.append((nproc, args)) or 0)
    source = ["--from", "minilm", "--method", "lora"] if verb == "finetune" and "--resume" not in argv else []
    assert cli.main(["--debug", verb, *argv, *source]) == 0
    assert calls == [(2, ["--debug", verb, *passed, *source])]


@pytest.mark.parametrize("error, shown", [(RuntimeError("boom\nsecond line"), "RuntimeError: boom"),
                                          (RecursionError("maximum recursion depth"),
                                           "RecursionError: maximum recursion depth"),
                                          (ValueError(""), "ValueError: ValueError")])
def test_an_unexpected_error_is_one_line_exit_1_and_debug_shows_it(monkeypatch, capsys, error, shown):
    from zerotune import cli
    from zerotune.evaluate import api

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(api, "evaluate", broken)
    assert cli.main(["evaluate", "somewhere"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: internal error in evaluate: {shown}; rerun with --debug for the traceback"]
    with pytest.raises(type(error)):
        cli.main(["--debug", "evaluate", "somewhere"])
