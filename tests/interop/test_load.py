"""zerotune.load: (model, tokenizer) from minilm, a Hugging Face folder or a run folder."""

import pytest
import torch

import zerotune
from tests.conftest import tiny_config
from zerotune.errors import ZerotuneError
from zerotune.models.gpt import GPT, GPTConfig


def test_load_minilm_gives_hidden_states():
    model, tokenizer = zerotune.load("minilm")
    ids = torch.tensor([tokenizer.encode("a tiny sentence").ids])
    assert model(ids).shape == (1, ids.shape[1], 384)
    assert not model.training


def test_load_hf_decoder_folder_gives_logits(tmp_path):
    from zerotune.interop.hf_decoder import export_hf_decoder

    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, d_model=16)
    torch.manual_seed(0)
    src = GPT(cfg).eval()
    export_hf_decoder(src, cfg, tmp_path / "hf")
    model, tokenizer = zerotune.load(tmp_path / "hf")
    x = torch.tensor([[1, 2, 3, 4]])
    assert tokenizer is None  # the folder has no tokenizer files
    torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=1e-5)


def test_load_run_folder(tmp_path):
    run = zerotune.train(tiny_config(epochs=1), out=tmp_path / "r", log=lambda *a: None)
    model, tokenizer = zerotune.load(run)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10) and tokenizer is None


@pytest.mark.parametrize("raw, fragment", [(b"[1, 2]", "expected a JSON object"), (b"\xff\xfe{", "not UTF-8 text"),
                                           (b'{"pooling_mode_mean', "not valid JSON")])
def test_bad_sentence_transformers_pooling_file_is_one_line(tmp_path, raw, fragment):
    from zerotune.interop.hf import sentence_pooling

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_bytes(raw)
    with pytest.raises(ZerotuneError, match=rf"1_Pooling/config.json: {fragment}"):
        sentence_pooling(tmp_path)
