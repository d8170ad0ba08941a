"""export: LoRA merged, Hugging Face folders that transformers loads with the same logits, zerotune safetensors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

import zerotune
from tests.finetune.test_api import digits_cfg, lm_config, make_gpt_source, text_config, write_text_csv
from zerotune.errors import ZerotuneError
from zerotune.finetune.api import finetune
from zerotune.interop.export import export
from zerotune.load import load_run
from zerotune.models.heads import pool

transformers = pytest.importorskip("transformers")
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def minilm_lora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("minilm")
    cfg = text_config(write_text_csv(tmp / "reviews.csv"), lora={"r": 4, "alpha": 8})
    cfg["train"]["max_steps"] = 1
    return finetune(cfg, "minilm", method="lora", out=tmp / "run", **QUIET)


def test_bert_classifier_to_hf_matches_transformers(minilm_lora, tmp_path):
    folder = export(minilm_lora, "hf", tmp_path / "hf")
    head = json.loads((folder / "head.json").read_text())
    assert head["pooling"] == "mean" and head["classes"] == ["neg", "pos"]
    theirs = transformers.AutoModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts = ["what a great and happy day", "rude people"]
    enc = tok(texts, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    ours = load_run(minilm_lora)
    assert enc["input_ids"][0].tolist() == ours.tokenizer.encode(texts[0]).ids[:8]  # same tokenizer
    with torch.no_grad():
        hidden = theirs(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        w = load_file(folder / "head.safetensors")
        expected = pool(hidden, enc["attention_mask"], "mean") @ w["weight"].T + w["bias"]  # (B, 2)
        got = ours.model(enc["input_ids"])  # LoRA unmerged, padding found from the pad id
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_lora_safetensors_export_is_a_plain_run(minilm_lora, tmp_path):
    folder = export(minilm_lora, "safetensors", tmp_path / "st")
    meta = json.loads((folder / "model.json").read_text())
    assert meta["method"] == "full" and meta["merged_from"] == "lora" and "lora" not in meta
    ids = torch.tensor([[101, 2307, 2154, 102, 0, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(load_run(folder).model(ids), load_run(minilm_lora).model(ids),
                                   rtol=0, atol=1e-5)


def test_gpt_lora_to_hf_matches_transformers(tmp_path):
    source, shards = make_gpt_source(tmp_path)
    run = finetune(lm_config(shards), source, method="lora", out=tmp_path / "run", **QUIET)
    folder = export(run, "hf", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = load_run(run).model
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, rtol=0, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(folder)("the cat")["input_ids"] == \
        load_run(run).tokenizer.encode("the cat").ids


def test_classic_net_exports_safetensors_only(tmp_path):
    run = zerotune.train(digits_cfg([0, 1, 2]) | {"train": {"epochs": 1, "progress": False}}, out=tmp_path / "r",
                         **QUIET)
    with pytest.raises(ZerotuneError, match=r"r: --format hf: a cnn model has no Hugging Face counterpart"):
        export(run, "hf", tmp_path / "hf")
    folder = export(run, "safetensors", tmp_path / "st")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_run(folder).model(x), load_run(run).model(x), rtol=0, atol=0)
    with pytest.raises(ZerotuneError, match="--format: expected one of hf, safetensors, onnx, got 'gguf'"):
        export(run, "gguf", tmp_path / "x")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="qlora needs bitsandbytes")
def test_qlora_run_exports_dequantized_and_merged(tmp_path):
    """The 4-bit base goes back to float before the adapters merge: the export computes what the run does."""
    from tests.finetune.test_distributed import LORA, ft_config, make_source

    source, shards = make_source(tmp_path)
    run = finetune(ft_config(shards, **LORA), source, method="qlora", out=tmp_path / "run", **QUIET)
    folder = export(run, "safetensors", tmp_path / "st")
    meta = json.loads((folder / "model.json").read_text())
    assert meta["method"] == "full" and meta["merged_from"] == "qlora" and "qlora_bits" not in meta
    idx = torch.randint(0, 12, (2, 8), generator=torch.Generator().manual_seed(0))
    # the run's model in train mode (no dropout in this config): bitsandbytes then computes in fp32;
    # in eval mode its CPU kernel may switch to bf16 and differ by ~1e-3 from any fp32 model
    qlora = load_run(run).model.train()
    with torch.no_grad():
        torch.testing.assert_close(load_run(folder).model(idx), qlora(idx), rtol=0, atol=1e-4)
