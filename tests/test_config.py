import re

import pytest

from zerotune.config import Config, load_config, parse_overrides
from zerotune.errors import ZerotuneError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_fill_missing_keys_only(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\nmodel:\n  arch: mlp\n  hidden: [16]\n"))
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 32
    assert cfg.model.hidden == [16] and cfg.model.activation == "relu"


def test_overrides_are_typed():
    cfg = load_config({}, ["train.epochs=5", "model.hidden=[8, 4]", "optim.lr=0.1", "train.compile=true"])
    assert cfg.train.epochs == 5 and cfg.model.hidden == [8, 4] and cfg.optim.lr == 0.1 and cfg.train.compile


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  epochs: five\n", "c.yaml: train.epochs: expected an integer, got 'five'"),
        ("train:\n  epochz: 3\n", "c.yaml: train.epochz: unknown key"),
        ("0: 1\n", "c.yaml: 0: keys should be strings, got 0"),
        ("optim:\n  lr: -1\n", "c.yaml: optim.lr: input should be greater than 0, got -1"),
        ("model:\n  arch: nope\n", "c.yaml: model.arch: unknown arch 'nope'"),
        ("model:\n  arch: mlp\n  hidden: [4, x]\n", "c.yaml: model.hidden[1]: expected an integer, got 'x'"),
        ("", "c.yaml: config is empty; expected a YAML mapping"),
        ("- 1\n- 2\n", "c.yaml: expected a YAML mapping at the top level, got list"),
        ("train: [1\n", "c.yaml: line 2: invalid YAML"),
        ("x: !!python/object/apply:os.system ['echo hi']\n", "c.yaml: line 1: invalid YAML"),
        ("optim:\n  name: sgd\n  nesterov: true\n", "optim.nesterov needs optim.momentum > 0"),
    ],
)
def test_bad_configs_give_one_line_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(ZerotuneError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ZerotuneError, match="nope.yaml: file not found"):
        load_config("nope.yaml")


def test_set_without_equals():
    with pytest.raises(ZerotuneError, match="expected KEY=VALUE"):
        parse_overrides(["train.epochs"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config({"model": {"arch": "mlp", "init": "normal(0.02)"}}, ["train.epochs=4"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "linear", "factor": -2}, "factor must be a finite number > 0, got -2"),
    ({"rope_type": "linear", "factor": float("nan")}, "factor must be a finite number > 0, got nan"),
    ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
      "original_max_position_embeddings": 64}, "high_freq_factor must be larger than low_freq_factor"),
])
def test_rope_scaling_values_are_bounded(scaling, message):
    with pytest.raises(ZerotuneError, match=f"model.rope_scaling: {message}"):
        load_config({"model": {"arch": "gpt", "pos": "rope", "norm": "rmsnorm", "rope_scaling": scaling}})


@pytest.mark.parametrize("override, message", [
    ("model.hiden=[3]", "model.hiden: unknown key; did you mean 'hidden'?"),
    ("train.epoch=3", "train.epoch: unknown key; did you mean 'epochs'?"),
    ("dta.train=x", "dta: unknown key; did you mean 'data'?"),
    ("train.early_stopping.patiense=3", "train.early_stopping.patiense: unknown key; did you mean 'patience'?"),
    ("train.zzz=1", "train.zzz: unknown key"),
])
def test_an_unknown_key_suggests_the_closest_one(override, message):
    with pytest.raises(ZerotuneError, match=f"^config: {re.escape(message)}$"):
        load_config({}, [override])


def test_zerotune_set_applies_after_the_overrides_and_says_so(monkeypatch):
    from zerotune.config import training_overrides

    said = []
    monkeypatch.setenv("ZEROTUNE_SET", "train.max_steps=3  train.epochs=1")
    assert training_overrides(["train.epochs=9", "seed=4"], said.append) == {"train.epochs": 1, "seed": 4,
                                                                             "train.max_steps": 3}
    assert said == ["ZEROTUNE_SET: train.max_steps=3 train.epochs=1 (applied after the config and --set)"]
    monkeypatch.setenv("ZEROTUNE_SET", "")
    assert training_overrides({"seed": 1}, said.append) == {"seed": 1} and len(said) == 1
