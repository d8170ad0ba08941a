"""int8 weight-only quantization: codes and scales by hand, the error bound, runs end to end, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import zerotune
from tests.compress.conftest import QUIET, snapshot
from tests.conftest import tiny_config
from zerotune import cli
from zerotune.compress.api import prune, quantize, scalar_metrics
from zerotune.compress.quantize import dequantize_state_dict, dequantize_tensor, quantize_tensor
from zerotune.errors import ZerotuneError
from zerotune.load import load_run


def test_known_tensor_exact_int8_codes_and_scales():
    w = torch.tensor([[1.27, -0.5, 0.123, 0.0],
                      [-2.54, 0.1, 0.066, 1.0],
                      [0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_tensor(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    # s = max|w_row| / 127: 0.01, 0.02, and 0 for the zero row; q = round(w / s)
    torch.testing.assert_close(s, torch.tensor([1.27, 2.54, 0.0]) / 127, rtol=0, atol=0)
    assert q.tolist() == [[127, -50, 12, 0], [-127, 5, 3, 50], [0, 0, 0, 0]]
    torch.testing.assert_close(dequantize_tensor(q, s), q.float() * s[:, None], rtol=0, atol=0)


def test_conv_weight_has_one_scale_per_output_channel():
    w = torch.tensor([[[[0.4, -1.0], [0.2, 0.0]]], [[[0.0, 0.2], [-0.6, 0.6]]]])  # (out 2, in 1, 2, 2)
    q, s = quantize_tensor(w)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.6]) / 127, rtol=0, atol=0)
    # 0.4 · 127 = 50.8, 0.2 · 127 = 25.4, 0.2 / 0.6 · 127 = 42.33
    assert q.shape == w.shape and q.flatten(1).tolist() == [[51, -127, 25, 0], [0, 42, -127, 127]]


def test_dequantization_error_is_at_most_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 33, generator=g) * 10.0 ** torch.randint(-4, 3, (64, 1), generator=g)  # rows of any scale
    q, s = quantize_tensor(w)
    err = (w.double() - dequantize_tensor(q, s).double()).abs()  # (64, 33)
    # s/2 from rounding to the nearest integer, plus two float32 roundings (w / s, then q · s), each at
    # most 127 · s · 2⁻²⁴ since |w / s| ≤ 127
    bound = s.double()[:, None] * (0.5 + 2 * 127 * 2.0**-24)
    assert (err <= bound).all()
    assert (err > 0.4 * s.double()[:, None]).any()  # the bound is not vacuous: errors reach near s/2


def test_dequantize_state_dict_names_a_missing_scale():
    q, s = quantize_tensor(torch.randn(3, 4))
    meta = {"tensors": ["fc.weight"]}
    out = dequantize_state_dict({"fc.weight": q, "fc.weight.scale": s, "fc.bias": torch.zeros(3)}, meta, "m")
    assert set(out) == {"fc.weight", "fc.bias"} and out["fc.weight"].dtype == torch.float32
    with pytest.raises(ZerotuneError, match=r"m: quantized tensor 'fc.weight' or its scale 'fc.weight.scale'"):
        dequantize_state_dict({"fc.weight": q}, meta, "m")
    with pytest.raises(ZerotuneError, match=r"not int8"):
        dequantize_state_dict({"fc.weight": q.float(), "fc.weight.scale": s}, meta, "m")


def test_digits_run_quantized_through_the_cli(digits_run, tmp_path, capsys):
    source = snapshot(digits_run)
    out = tmp_path / "int8"
    assert cli.main(["quantize", str(digits_run), "--bits", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int8" in printed and "accuracy" in printed and "MB" in printed
    assert snapshot(digits_run) == source

    stored, float_weights = load_file(out / "model.safetensors"), load_file(digits_run / "model.safetensors")
    meta = json.loads((out / "model.json").read_text())
    assert meta["quantization"]["tensors"] == ["net.1.weight", "net.3.weight"] and meta["quantization"]["bits"] == 8
    assert set(stored) == set(float_weights) | {"net.1.weight.scale", "net.3.weight.scale"}
    model = load_run(out).model.state_dict()
    for name in ("net.1.weight", "net.3.weight"):
        q, s = stored[name], stored[f"{name}.scale"]
        assert q.dtype == torch.int8 and s.shape == (q.shape[0],)
        torch.testing.assert_close((q, s), quantize_tensor(float_weights[name]), rtol=0, atol=0)
        torch.testing.assert_close(model[name], dequantize_tensor(q, s), rtol=0, atol=0)  # load_run: w = q · s
    for name in ("net.1.bias", "net.3.bias"):  # biases stay float, unchanged
        torch.testing.assert_close(stored[name], float_weights[name], rtol=0, atol=0)

    report = json.loads((out / "compress.json").read_text())
    sizes = report["sizes"]
    assert sizes["quantized_tensors"] == {"float": 4 * (32 * 64 + 10 * 32), "int8_with_scales": 32 * 64 + 10 * 32
                                          + 4 * (32 + 10)}
    assert sizes["source_file"] == (digits_run / "model.safetensors").stat().st_size > sizes["quantized_file"]
    assert report["after"] == scalar_metrics(zerotune.evaluate(out, overwrite=True))
    assert report["before"]["split"] == "test"
    assert zerotune.predict(out, "builtin:digits").is_file()


def test_int8_run_exports_and_prunes_as_a_float_run(digits_run, tmp_path):
    int8 = quantize(digits_run, out=tmp_path / "int8", **QUIET)
    exported = zerotune.export(int8, "safetensors", tmp_path / "export")
    assert "quantization" not in json.loads((exported / "model.json").read_text())
    assert all(t.dtype == torch.float32 for t in load_file(exported / "model.safetensors").values())
    x = torch.randn(4, *load_run(int8).info.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(load_run(exported).model(x), load_run(int8).model(x), rtol=0, atol=0)
    pruned = zerotune.prune(int8, amount=0.5, out=tmp_path / "pruned", **QUIET)
    meta = json.loads((pruned / "model.json").read_text())
    assert "quantization" not in meta and meta["pruning"]["sparsity"] == 0.5


def test_gpt_run_quantized_then_generate(gpt_run, tmp_path, capsys):
    out = tmp_path / "int8"
    assert cli.main(["quantize", str(gpt_run), "--out", str(out)]) == 0
    stored = load_file(out / "model.safetensors")
    assert stored["blocks.0.attn.qkv.weight"].dtype == torch.int8
    assert stored["tok_emb.weight"].dtype == torch.float32  # embeddings and the tied head stay float
    report = json.loads((out / "compress.json").read_text())
    assert {"loss", "perplexity"} <= set(report["before"]) and "(val)" in report["after"]["split"]
    capsys.readouterr()
    assert cli.main(["generate", str(out), "--prompt", "the ", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the ") and len(text) > len("the \n")


def test_bits_other_than_8_is_one_line_and_touches_nothing(digits_run, tmp_path, capsys):
    source = snapshot(digits_run)
    for bits in ("4", "16", "eight"):
        assert cli.main(["quantize", str(digits_run), "--bits", bits, "--out", str(tmp_path / "q")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "--bits" in err
    assert not (tmp_path / "q").exists() and snapshot(digits_run) == source


def test_not_a_run_folder_and_existing_out(digits_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["quantize", str(tmp_path / "empty")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    source = snapshot(digits_run)
    assert cli.main(["quantize", str(digits_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
    assert snapshot(out) == {"keep.txt": b"mine"} and snapshot(digits_run) == source


def test_cnn_run_conv_weights_quantized_and_pruned_per_output_channel(tmp_path):
    cfg = tiny_config(epochs=1) | {"model": {"arch": "cnn", "channels": [4], "hidden": [8]}}
    run = zerotune.train(cfg, out=tmp_path / "cnn", **QUIET)
    conv = next(name for name, m in load_run(run).model.named_modules() if isinstance(m, torch.nn.Conv2d))
    stored = load_file(quantize(run, **QUIET) / "model.safetensors")
    q, s = stored[f"{conv}.weight"], stored[f"{conv}.weight.scale"]
    assert q.dtype == torch.int8 and q.shape[:2] == (4, 1) and s.shape == (4,)
    assert (q.flatten(1).abs().amax(1) == 127).all()  # each output channel's largest |w| maps to ±127
    pruned = prune(run, amount=0.25, **QUIET)
    assert json.loads((pruned / "model.json").read_text())["pruning"]["tensors"][f"{conv}.weight"] == 9 / 36  # 4·1·3·3
    assert "accuracy" in zerotune.evaluate(tmp_path / "cnn-int8", overwrite=True)
