"""export --format onnx: onnxruntime on raw inputs gives the run's own numbers, at any batch size and length."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import zerotune
from tests.finetune.test_api import text_config, write_text_csv
from tests.test_text_classification import write_reviews
from zerotune.cli import main
from zerotune.config import load_config
from zerotune.errors import ZerotuneError
from zerotune.finetune.api import finetune
from zerotune.interop.export import export
from zerotune.load import load_run

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
QUIET = {"log": lambda *_: None}
STEPS = {"epochs": None, "max_steps": 3, "batch_size": 16, "progress": False}


def train(tmp: Path, data: dict, model: dict, **extra) -> Path:
    cfg = {"seed": 0, "data": {"val_split": 0.0, "test_split": 0.1} | data, "model": model, "train": STEPS} | extra
    return zerotune.train(cfg, out=tmp / "run", **QUIET)


def onnx_run(folder: Path, **inputs: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(folder / "model.onnx"))
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


def expected(run: Path, x: torch.Tensor) -> torch.Tensor:
    """What zerotune computes for raw features: normalise, the model, back to the data's units."""
    loaded = load_run(run)
    with torch.no_grad():
        return loaded.preprocess.y_inverse(loaded.model(loaded.preprocess.x(x)))


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("mlp"), {"train": "builtin:digits"}, {"arch": "mlp", "hidden": [16]})


def test_mlp_classifier_takes_raw_inputs_and_matches_predict(mlp_run, tmp_path, capsys):
    assert load_run(mlp_run).preprocess.x_mean is not None  # the digits are normalised: the graph must do it
    out = tmp_path / "onnx"
    assert main(["export", str(mlp_run), "--format", "onnx", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"exported: {out}"
    meta = json.loads((out / "model.json").read_text())
    assert meta["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]
    assert json.loads((out / "labels.json").read_text()) == [str(i) for i in range(10)]
    for batch in (3, 7):
        x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch)) * 16  # raw pixel values
        torch.testing.assert_close(onnx_run(out, input=x), expected(mlp_run, x), rtol=0, atol=1e-4)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 16
    np.savez(tmp_path / "new.npz", x=x.numpy(), y=np.zeros(5, dtype=np.int64))
    rows = list(csv.DictReader(open(zerotune.predict(mlp_run, str(tmp_path / "new.npz"), tmp_path / "p.csv"))))
    prob, idx = onnx_run(out, input=x).softmax(-1).max(-1)
    assert [r["prediction"] for r in rows] == [str(i) for i in idx.tolist()]
    torch.testing.assert_close(torch.tensor([float(r["probability"]) for r in rows]), prob, rtol=0, atol=1e-4)


def test_cnn_classifier(tmp_path):
    run = train(tmp_path, {"train": "builtin:digits"}, {"arch": "cnn", "channels": [4], "hidden": [8]})
    out = export(run, "onnx", tmp_path / "onnx")
    for batch in (2, 5):
        x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch)) * 16
        torch.testing.assert_close(onnx_run(out, input=x), expected(run, x), rtol=0, atol=1e-4)


def test_regression_outputs_values_in_the_datas_units(tmp_path):
    run = train(tmp_path, {"train": "builtin:diabetes"}, {"arch": "mlp", "hidden": [8]}, task="regression",
                train=STEPS | {"metrics": ["mse"]})
    pre = load_run(run).preprocess
    assert pre.y_mean is not None and pre.y_std > 1  # target scaling is real, so the inverse must be in the graph
    out = export(run, "onnx", tmp_path / "onnx")
    meta = json.loads((out / "model.json").read_text())
    assert meta["outputs"][0]["name"] == "values" and not (out / "labels.json").exists()
    for batch in (1, 4):
        x = torch.randn(batch, 10, generator=torch.Generator().manual_seed(batch)) * 0.05
        torch.testing.assert_close(onnx_run(out, input=x), expected(run, x), rtol=0, atol=1e-4)


def test_rnn_on_sequences(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "seq.npz", x=rng.normal(3, 2, (64, 5, 3)).astype(np.float32), y=rng.integers(0, 3, 64))
    run = train(tmp_path, {"train": f"arrays:{tmp_path / 'seq.npz'}"}, {"arch": "rnn", "cell": "lstm", "hidden": 8})
    out = export(run, "onnx", tmp_path / "onnx")
    for batch in (2, 6):
        x = torch.randn(batch, 5, 3, generator=torch.Generator().manual_seed(batch)) * 2 + 3
        torch.testing.assert_close(onnx_run(out, input=x), expected(run, x), rtol=0, atol=1e-4)


def test_rnn_on_token_ids_is_refused(tmp_path):
    write_reviews(tmp_path / "rev.csv", 40, 0)
    run = train(tmp_path, {"train": f"csv:{tmp_path / 'rev.csv'}", "max_length": 8},
                {"arch": "rnn", "cell": "gru", "hidden": 8, "embed_dim": 8})
    with pytest.raises(ZerotuneError, match="an rnn on token ids packs its sequences"):
        export(run, "onnx", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_bert_classifier_with_attention_mask(tmp_path):
    write_reviews(tmp_path / "rev.csv", 40, 0)
    run = train(tmp_path, {"train": f"csv:{tmp_path / 'rev.csv'}", "max_length": 12},
                {"arch": "bert", "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32})
    out = export(run, "onnx", tmp_path / "onnx")
    loaded = load_run(run)
    pad = loaded.info.pad_id
    assert (out / "tokenizer.json").is_file() and json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
    vocab = loaded.info.vocab_size
    for batch, length in ((2, 6), (4, 13)):
        ids = torch.randint(pad + 1, vocab, (batch, length), generator=torch.Generator().manual_seed(length))
        ids[0, length // 2 :] = pad  # one padded row
        with torch.no_grad():
            want = loaded.model(ids)  # zerotune finds the padding from the pad id
        got = onnx_run(out, input_ids=ids, attention_mask=(ids != pad).long())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_minilm_lora_classifier_is_merged(tmp_path):
    """The pretrained 22M-parameter encoder with LoRA on query/value and a new head (a few seconds)."""
    cfg = text_config(write_text_csv(tmp_path / "reviews.csv"), lora={"r": 4, "alpha": 8})
    cfg["train"]["max_steps"] = 1
    run = finetune(cfg, "minilm", method="lora", out=tmp_path / "run", **QUIET)
    out = export(run, "onnx", tmp_path / "onnx")
    assert json.loads((out / "model.json").read_text())["merged_from"] == "lora"
    model = load_run(run).model  # base + unmerged adapters
    for batch, length in ((2, 8), (3, 11)):
        ids = torch.randint(1000, 30000, (batch, length), generator=torch.Generator().manual_seed(length))
        ids[:, 0], ids[-1, 5:] = 101, 0  # [CLS] first; the last row padded
        with torch.no_grad():
            want = model(ids)
        got = onnx_run(out, input_ids=ids, attention_mask=(ids != 0).long())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    from zerotune.data.shards import prepare
    from zerotune.data.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("gpt")
    words = "the cat sat on a mat and the dog ran to the park while birds sang".split()
    rng = random.Random(0)
    with open(tmp / "corpus.jsonl", "w") as f:
        for _ in range(100):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n")
    tok = train_tokenizer(f"jsonl:{tmp / 'corpus.jsonl'}", 300, tmp / "tok", progress=False)
    prepare(f"jsonl:{tmp / 'corpus.jsonl'}", tok.parent, tmp / "shards", val_fraction=0.2, progress=False)
    cfg = {"seed": 0, "task": "causal_lm", "data": {"train": f"shards:{tmp / 'shards'}", "max_length": 16},
           "model": {"arch": "gpt", "block_size": 32, "n_layer": 1, "n_head": 2, "d_model": 16},
           "train": STEPS | {"batch_size": 4}}
    return zerotune.train(cfg, out=tmp / "run", **QUIET)


def check_decoder(run: Path, out: Path) -> None:
    model = load_run(run).model
    for batch, length in ((2, 5), (3, 17)):
        ids = torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            torch.testing.assert_close(onnx_run(out, input_ids=ids), model(ids), rtol=0, atol=1e-4)


def test_gpt_decoder_logits_at_any_batch_and_length(gpt_run, tmp_path):
    out = export(gpt_run, "onnx", tmp_path / "onnx")
    meta = json.loads((out / "model.json").read_text())
    assert meta["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    assert meta["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 300]}]
    assert (out / "tokenizer.json").is_file()
    check_decoder(gpt_run, out)


def test_lora_run_is_merged_into_the_graph(gpt_run, tmp_path):
    data = load_config(gpt_run / "config.yaml").data.train  # the same shards
    lora_cfg = {"seed": 0, "task": "causal_lm", "data": {"train": data, "max_length": 16},
                "optim": {"name": "adamw", "lr": 3e-2}, "train": STEPS | {"batch_size": 4}}
    run = finetune(lora_cfg, gpt_run, method="lora", out=tmp_path / "lora", **QUIET)
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the adapters moved the logits, so a graph without them would fail below
        assert (load_run(run).model(ids) - load_run(gpt_run).model(ids)).abs().max() > 1e-3
    out = export(run, "onnx", tmp_path / "onnx")
    assert json.loads((out / "model.json").read_text())["merged_from"] == "lora"
    check_decoder(run, out)  # the run's own model is base + unmerged adapters


def test_bert_masked_lm(gpt_run, tmp_path):
    shards = load_config(gpt_run / "config.yaml").data.train
    cfg = {"seed": 0, "task": "masked_lm", "data": {"train": shards, "max_length": 16},
           "model": {"arch": "bert", "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32}, "train": STEPS}
    run = zerotune.train(cfg, out=tmp_path / "run", **QUIET)
    out = export(run, "onnx", tmp_path / "onnx")
    model = load_run(run).model
    for batch, length in ((2, 5), (3, 19)):
        ids = torch.randint(1, 300, (batch, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones_like(ids)
        mask[0, 3:] = 0  # one row with padding at the end
        with torch.no_grad():
            want = model(ids, attention_mask=mask)
        torch.testing.assert_close(onnx_run(out, input_ids=ids, attention_mask=mask), want, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- bad input, through the command line


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_unknown_format(mlp_run, tmp_path, capsys):
    assert main(["export", str(mlp_run), "--format", "tflite", "--out", str(tmp_path / "x")]) == 2
    assert "argument --format: invalid choice: 'tflite'" in one_line(capsys)
    assert not (tmp_path / "x").exists()


def test_existing_folder_is_not_touched(mlp_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(mlp_run), "--format", "onnx", "--out", str(out)]) == 2
    assert "taken: holds files and is not an export folder" in one_line(capsys)
    assert main(["export", str(mlp_run), "--format", "onnx", "--out", str(out), "--overwrite"]) == 2
    assert "--overwrite replaces only an export folder" in one_line(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_missing_packages(mlp_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    assert main(["export", str(mlp_run), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert one_line(capsys) == ("error: --format onnx needs the onnx and onnxscript packages: "
                                "pip install 'zerotune[onnx]'")
    assert not (tmp_path / "x").exists()


def test_exporter_failure_leaves_nothing(mlp_run, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("unsupported operator\n(a long report follows)")

    monkeypatch.setattr(torch.onnx, "export", fail)
    assert main(["export", str(mlp_run), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert one_line(capsys).endswith("--format onnx: torch.onnx could not export this model "
                                     "(RuntimeError: unsupported operator)")
    assert not (tmp_path / "x").exists()
