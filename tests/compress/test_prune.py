"""Magnitude pruning: the zeros by hand, the layers chosen, a digits run and a LoRA run end to end, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import zerotune
from tests.compress.conftest import QUIET, snapshot
from zerotune import cli
from zerotune.compress.api import prune, scalar_metrics
from zerotune.compress.layers import weight_layers
from zerotune.compress.prune import prune_tensors, sparsity
from zerotune.evaluate.api import measure
from zerotune.finetune.lora import unwrap_lora
from zerotune.load import load_run
from zerotune.models.gpt import GPT, GPTConfig


def exact(got: torch.Tensor, want: list) -> None:
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=0)


def test_layer_scope_zeros_the_smallest_round_a_n_of_each_tensor():
    a = torch.tensor([[0.1, -0.5, 0.3, -0.2], [0.4, 0.05, -0.6, 0.7]])
    b = torch.tensor([3.0, -1.0, 2.0])
    ties = torch.ones(4)
    assert prune_tensors([a, b, ties], 0.5, "layer") is None
    # a: the 4 smallest |w| are 0.05, 0.1, 0.2, 0.3; b: round(1.5) = 2 of 3; ties: the first two positions
    exact(a, [[0.0, -0.5, 0.0, 0.0], [0.4, 0.0, -0.6, 0.7]])
    assert b.tolist() == [3.0, 0.0, 0.0]
    assert ties.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert sparsity(a) == 0.5 and sparsity(b) == 2 / 3


def test_global_scope_uses_one_threshold_over_all_tensors():
    a = torch.tensor([0.1, -0.9, 0.2, 0.8, -0.7, 0.6])
    b = torch.tensor([[0.05, -0.15]])
    threshold = prune_tensors([a, b], 0.5, "global")  # k = round(0.5 · 8) = 4: 0.05, 0.1, 0.15, 0.2
    assert threshold == torch.tensor(0.2).item()  # the float32 nearest 0.2
    exact(a, [0.0, -0.9, 0.0, 0.8, -0.7, 0.6])
    assert b.tolist() == [[0.0, 0.0]]
    assert (sparsity(a), sparsity(b)) == (2 / 6, 1.0)  # 4 of 8 overall, unevenly: b's weights were small


def test_amount_zero_changes_nothing():
    w = torch.randn(5, 7)
    before = w.clone()
    assert prune_tensors([w], 0.0, "global") is None
    prune_tensors([w], 0.0, "layer")
    assert torch.equal(w, before)


@pytest.mark.parametrize("tied", [True, False])
def test_weight_layers_skip_embeddings_and_the_lm_head_unless_asked(tied):
    cfg = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, d_model=8, tie_embeddings=tied)
    model = GPT(cfg)
    block = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj"]
    assert list(weight_layers(model)) == block
    everything = list(weight_layers(model, include_embeddings=True))
    head = [] if tied else ["lm_head"]  # tied: the head's weight is tok_emb's, pruned once
    assert everything == ["tok_emb", "pos_emb", *block, *head]


def test_digits_run_pruned_through_the_cli(digits_run, tmp_path, capsys):
    source = snapshot(digits_run)
    out = tmp_path / "pruned"
    assert cli.main(["prune", str(digits_run), "--amount", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "source" in printed and "pruned" in printed

    meta = json.loads((out / "model.json").read_text())
    p = meta["pruning"]
    assert (p["amount"], p["scope"], p["method"]) == (0.5, "layer", "magnitude")
    weights = load_file(out / "model.safetensors")
    assert list(p["tensors"]) == ["net.1.weight", "net.3.weight"]  # flatten, linear, relu, linear
    for name, s in p["tensors"].items():
        n = weights[name].numel()
        assert s == round(0.5 * n) / n == sparsity(weights[name])
    for name, w in weights.items():  # biases untouched
        if name.endswith("bias"):
            assert sparsity(w) < 0.5
    assert p["sparsity"] == p["zeros"] / p["weights"] == 0.5

    report = json.loads((out / "compress.json").read_text())
    assert report["method"] == "prune" and report["source"] == str(digits_run)
    assert {"accuracy", "loss", "f1", "n", "split"} <= set(report["before"]) and report["before"]["split"] == "test"
    assert report["before"] == scalar_metrics(measure(load_run(digits_run)))  # measured, not written into RUN
    assert report["after"] == scalar_metrics(zerotune.evaluate(out, overwrite=True))
    assert zerotune.predict(out, "builtin:digits").is_file()
    assert snapshot(digits_run) == source


def test_source_run_is_untouched_byte_for_byte(digits_run, tmp_path):
    source = snapshot(digits_run)
    out = prune(digits_run, amount=0.75, scope="global", out=tmp_path / "g", **QUIET)
    assert snapshot(digits_run) == source
    meta = json.loads((out / "model.json").read_text())
    p = meta["pruning"]
    assert p["zeros"] == round(0.75 * p["weights"])  # global: exactly round(a · N) of all pruned weights
    torch.testing.assert_close(torch.tensor(p["sparsity"]), torch.tensor(0.75), rtol=0, atol=1 / p["weights"])


def test_lora_run_is_merged_then_pruned(gpt_run, gpt_lora_run, tmp_path):
    expected = load_run(gpt_lora_run).model
    unwrap_lora(expected)  # W + (α/r) B A
    base = load_run(gpt_run).model.blocks[0].attn.qkv.weight
    assert not torch.equal(expected.blocks[0].attn.qkv.weight, base)  # the adapters matter
    layers = weight_layers(expected)
    prune_tensors([m.weight.data for m in layers.values()], 0.3, "layer")

    out = prune(gpt_lora_run, amount=0.3, out=tmp_path / "p", **QUIET)
    meta = json.loads((out / "model.json").read_text())
    assert meta["method"] == "full" and meta["merged_from"] == "lora" and "lora" not in meta
    assert not (out / "adapter.safetensors").exists()
    got = load_run(out).model
    for name, want in expected.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], want, rtol=0, atol=0)
    report = json.loads((out / "compress.json").read_text())
    assert {"loss", "perplexity"} <= set(report["before"]) and "(val)" in report["before"]["split"]
    again = zerotune.evaluate(out, overwrite=True)
    assert report["after"]["perplexity"] == pytest.approx(again["perplexity"], rel=1e-6)
    assert zerotune.generate(out, ["the "], max_new_tokens=4, temperature=0, seed=0)


@pytest.mark.parametrize("amount", ["1", "1.5", "-0.1", "nan", "half"])
def test_amount_outside_0_1_is_one_line_and_touches_nothing(digits_run, tmp_path, capsys, amount):
    source = snapshot(digits_run)
    assert cli.main(["prune", str(digits_run), "--amount", amount, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--amount" in err
    assert not (tmp_path / "p").exists() and snapshot(digits_run) == source


def test_not_a_run_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    assert cli.main(["prune", str(tmp_path / "notarun"), "--amount", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a run folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notarun"]


def test_existing_out_needs_overwrite(digits_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    source = snapshot(digits_run)
    assert cli.main(["prune", str(digits_run), "--amount", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
    assert snapshot(out) == {"keep.txt": b"mine"} and snapshot(digits_run) == source
    # a folder of other files is never replaced, --overwrite or not
    assert cli.main(["prune", str(digits_run), "--amount", "0.5", "--out", str(out), "--overwrite"]) == 2
    assert "is not a run folder" in capsys.readouterr().err and snapshot(out) == {"keep.txt": b"mine"}
    pruned = tmp_path / "pruned"  # an earlier pruned run: replaced with --overwrite only
    assert cli.main(["prune", str(digits_run), "--amount", "0.5", "--out", str(pruned)]) == 0
    assert cli.main(["prune", str(digits_run), "--amount", "0.8", "--out", str(pruned)]) == 2
    assert cli.main(["prune", str(digits_run), "--amount", "0.8", "--out", str(pruned), "--overwrite"]) == 0
    assert json.loads((pruned / "model.json").read_text())["pruning"]["amount"] == 0.8


def test_out_inside_the_source_is_refused(digits_run, capsys):
    source = snapshot(digits_run)
    assert cli.main(["prune", str(digits_run), "--amount", "0.5", "--out", str(digits_run / "pruned")]) == 2
    assert "never modified" in capsys.readouterr().err and snapshot(digits_run) == source
