"""inspect: parameter counts, measured FLOPs against hand formulas, memory, the table, example inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from zerotune.config import load_config
from zerotune.data.base import spec_path
from zerotune.data.sources import load_source
from zerotune.errors import ZerotuneError
from zerotune.inspect import example_input, format_report, human, inspect_model
from zerotune.models import build_model
from zerotune.models.rnn import RNNConfig, build
from zerotune.spec import DataInfo

TEN = [str(i) for i in range(10)]


def _mlp() -> nn.Module:
    info = DataInfo("image", [1, 28, 28], classes=TEN)
    return build_model(load_config({"model": {"arch": "mlp", "hidden": [64, 64]}}).model, info)


def test_mlp_counts_flops_and_rows():
    report = inspect_model(_mlp(), torch.zeros(5, 1, 28, 28))  # FLOPs are per example, whatever the batch
    assert report.total_params == report.trainable_params == 55_050
    assert report.flops_per_sample == 2 * (784 * 64 + 64 * 64 + 64 * 10)
    assert report.param_bytes == 55_050 * 4
    assert report.buffer_bytes == 0
    assert report.train_state_bytes == 4 * 55_050 * 4  # weights, grads, two Adam moments
    assert report.input_shape == [1, 28, 28] and report.input_dtype == "float32"
    linears = [r for r in report.rows if r.type == "Linear"]
    assert [(r.params, r.output_shape, r.flops) for r in linears] == [
        (50_240, [1, 64], 2 * 784 * 64),
        (4_160, [1, 64], 2 * 64 * 64),
        (650, [1, 10], 2 * 64 * 10),
    ]
    assert sum(r.params for r in report.rows) == report.total_params


def test_conv_flops_by_hand():
    """Conv2d 2→4, 3×3, same padding, on 5×5: 2·(2·3·3)·4 per output pixel × 25 pixels = 3,600."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    report = inspect_model(model, torch.randn(3, 2, 5, 5))
    assert report.flops_per_sample == 2 * 2 * 9 * 4 * 25 + 2 * 100 * 3
    assert report.rows[0].output_shape == [1, 4, 5, 5]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_flops_by_hand(bidirectional):
    """A fused LSTM runs W_ih and W_hh once per real token and direction: 2·T·4H·(F + H) each."""
    info = DataInfo("tokens", [7], classes=["a", "b"], vocab_size=20, pad_id=0)
    model = build(RNNConfig(cell="lstm", hidden=8, embed_dim=4, bidirectional=bidirectional), info)
    x = torch.tensor([[3, 4, 5, 6, 7, 0, 0]])  # 5 real tokens
    d = 2 if bidirectional else 1
    expected = d * 2 * 5 * 4 * 8 * (4 + 8) + 2 * (d * 8) * 2
    assert inspect_model(model, x).flops_per_sample == expected


def test_gru_formula_agrees_with_pytorch_count():
    """A GRU on CPU runs as plain matrix products that FlopCounterMode counts itself; the same
    2·T·Σ numel(W) rule the fused-kernel formulas use must give the same number."""
    info = DataInfo("sequence", [6, 3], classes=["a", "b"])
    model = build(RNNConfig(cell="gru", hidden=5, layers=2, bidirectional=True), info)
    weights = sum(p.numel() for n, p in model.rnn.named_parameters() if n.startswith("weight"))
    report = inspect_model(model, torch.randn(1, 6, 3))
    assert report.flops_per_sample == 2 * 6 * weights + 2 * 10 * 2


def test_tied_frozen_and_buffers():
    emb = nn.Embedding(10, 4)
    out = nn.Linear(4, 10, bias=False)
    out.weight = emb.weight  # tied: counted once
    norm = nn.BatchNorm1d(4)
    model = nn.ModuleDict({"emb": emb, "norm": norm, "out": out})
    model.forward = lambda ids: out(norm(emb(ids)))
    norm.weight.requires_grad_(False)
    report = inspect_model(model, torch.tensor([[1, 2]]).view(2))
    assert report.total_params == 40 + 8
    assert report.trainable_params == 40 + 4
    assert report.buffer_bytes == 4 * 4 + 4 * 4 + 8  # running mean, var (fp32), num_batches_tracked (int64)
    assert report.train_state_bytes == 48 * 4 + 3 * 44 * 4  # frozen weights need no grad or moments
    assert json.loads(json.dumps(report.to_dict()))["total_params"] == 48


def test_mode_and_weights_are_left_as_they_were():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inspect_model(model, torch.randn(4, 3))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # eval mode: BatchNorm statistics not updated


def test_format_report_is_a_table_with_totals():
    text = format_report(inspect_model(_mlp(), torch.zeros(1, 1, 28, 28)))
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "output", "shape", "params", "FLOPs"]
    assert any(line.split()[:2] == ["net.1", "Linear"] and "50,240" in line for line in lines)
    assert "parameters        55,050 (55,050 trainable, 0 frozen)" in text
    assert "FLOPs / example   109,824 (109.82k, forward)" in text
    assert "parameter memory  215.04 KiB" in text  # 220,200 bytes / 1024


def test_human():
    assert [human(999), human(1_234), human(5_600_000), human(7.2e9)] == ["999", "1.23k", "5.60M", "7.20G"]
    assert [human(512, "B"), human(2048, "B"), human(3 * 1024**3, "B")] == ["512 B", "2.00 KiB", "3.00 GiB"]


@pytest.mark.parametrize(
    "info, shape, dtype",
    [
        (DataInfo("image", [3, 32, 32]), (4, 3, 32, 32), torch.float32),
        (DataInfo("tabular", [10]), (4, 10), torch.float32),
        (DataInfo("sequence", [12, 3]), (4, 12, 3), torch.float32),
        (DataInfo("tokens", [16], vocab_size=5, pad_id=2), (4, 16), torch.long),
    ],
)
def test_example_input(info, shape, dtype):
    x = example_input(info, batch=4)
    assert x.shape == shape and x.dtype == dtype
    assert torch.equal(x, example_input(info, batch=4))  # seeded
    if info.kind == "tokens":
        assert x.min() >= 0 and x.max() < info.vocab_size and not (x == info.pad_id).any()
        assert len(x.unique()) == info.vocab_size - 1  # every id but the padding one occurs


@pytest.mark.parametrize(
    "info, message",
    [
        (DataInfo("graph", [3]), r"unknown data kind 'graph'"),
        (DataInfo("tokens", [8]), r"token data needs a vocab_size, got None"),
    ],
)
def test_example_input_bad_info(info, message):
    with pytest.raises(ZerotuneError, match=message):
        example_input(info)


@pytest.mark.parametrize("model", [{"arch": "cnn", "channels": [8, 16]}, {"arch": "rnn", "cell": "gru"}])
def test_inspect_a_config_end_to_end(model, tmp_path):
    """What ``zerotune inspect CONFIG`` does: config → data info → model → example → report."""
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data:\n  train: builtin:digits\nmodel: {model}\n")
    cfg = load_config(path)
    info = load_source(cfg.data.train, cfg.data).info
    net = build_model(cfg.model, info)
    report = inspect_model(net, example_input(info))
    assert report.total_params == sum(p.numel() for p in net.parameters())
    assert report.flops_per_sample > 0
    assert "FLOPs / example" in format_report(report)


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def digits_0to4(tmp_path_factory) -> Path:
    """The SOURCE configs/digits_transfer.yaml adapts, trained briefly (a fresh clone has no runs/)."""
    from zerotune.train.api import train

    config = Path(__file__).resolve().parents[1] / "configs" / "digits_cnn_0to4.yaml"
    return train(config, overrides=["train.epochs=1", "train.progress=false"],
                 out=tmp_path_factory.mktemp("src") / "digits_cnn_0to4", log=lambda *a: None)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_inspect_works_on_every_recipe(config, digits_0to4, capsys):
    """Fine-tuning recipes as the model they train; recipes whose data is not downloaded or prepared yet
    with what had to be assumed said first."""
    from zerotune.cli import main

    extra = ["--from", str(digits_0to4)] if config.name == "digits_transfer.yaml" else []
    assert main(["inspect", str(config), *extra]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOPs / example" in out
    cfg = load_config(config)
    data = spec_path(cfg.data.train)
    unknown = cfg.task in ("causal_lm", "masked_lm") and getattr(cfg.model, "vocab_size", 1) is None
    if data is not None and not data.exists() and (cfg.task == "classification" or unknown):
        assert out.startswith("note: ") and "not there yet" in out.splitlines()[0]


def test_a_fine_tuning_recipe_is_inspected_as_the_model_it_trains():
    import zerotune

    lora = zerotune.inspect(Path(__file__).resolve().parents[1] / "configs" / "minilm_classify.yaml")
    full = zerotune.inspect(Path(__file__).resolve().parents[1] / "configs" / "minilm_classify.yaml",
                            overrides=["finetune.method=full"])
    assert lora["total_params"] > full["total_params"]  # the adapters
    # LoRA r=16 on the 6 layers' query, key, value, out (384 → 384), up (384 → 1536) and down (1536 → 384):
    # 6 × 16 × (4 × (384 + 384) + 2 × (384 + 1536)) = 663,552; the head for 13 topics: 384 × 13 + 13 = 5,005
    assert lora["trainable_params"] == 668_557 < full["trainable_params"]  # adapters + head, as finetune reports


def test_every_verb_is_a_python_function_with_an_example():
    import zerotune

    for name in zerotune.VERBS:
        verb = getattr(zerotune, name)
        assert callable(verb) and "Example" in (verb.__doc__ or ""), name


def test_python_callers_read_python_words_in_errors(tmp_path, capsys):
    """The same refusal speaks flags on the command line and parameters in Python."""
    import zerotune
    from tests.conftest import tiny_config
    from zerotune.cli import main
    from zerotune.errors import ZerotuneError

    run = zerotune.train(tiny_config(epochs=1), out=tmp_path / "run", log=lambda *a: None)
    with pytest.raises(ZerotuneError, match=r"run: run folder already exists; pass overwrite=True to replace it or "
                                            r"out=\.\.\. to choose another$"):
        zerotune.train(tiny_config(), out=run)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config()))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(run)]) == 2
    assert "pass --overwrite to replace it or --out to choose another" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ZerotuneError, match=r"\(overwrite=True replaces only a run folder\)"):
        zerotune.train(tiny_config(), out=tmp_path / "mine")
    (tmp_path / "preds.csv").write_text("mine")
    with pytest.raises(ZerotuneError, match=r"preds.csv: already exists; pass overwrite=True to replace it$"):
        zerotune.predict(run, "builtin:digits", tmp_path / "preds.csv")
    assert (tmp_path / "preds.csv").read_text() == "mine"
