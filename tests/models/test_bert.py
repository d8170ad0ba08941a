"""BERT encoder: shapes, padding, heads chosen by target, hand parameter count, config round trip, errors.

Numerical parity with Hugging Face ``BertModel`` is in tests/interop/test_hf_bert.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import n_parameters
from zerotune.config import load_config
from zerotune.errors import ZerotuneError
from zerotune.models import build_model
from zerotune.models.bert import BERT, BERTConfig, BERTMaskedLM, attention_bias, build
from zerotune.models.heads import SequenceClassifier, TokenClassifier
from zerotune.spec import DataInfo

TINY = dict(vocab_size=99, hidden=32, layers=2, heads=4, intermediate=37, max_position=64)


def tiny(**kw) -> BERTConfig:
    return BERTConfig(**{**TINY, **kw})


def info(target: str = "classification", classes=("a", "b", "c")) -> DataInfo:
    return DataInfo("tokens", [16], target=target, classes=list(classes), vocab_size=99, pad_id=0)


def test_forward_shape_and_backward():
    torch.manual_seed(0)
    model = BERT(tiny())
    ids = torch.randint(1, 99, (3, 10))
    h = model(ids, attention_mask=torch.ones(3, 10), token_type_ids=torch.zeros(3, 10, dtype=torch.long))
    assert h.shape == (3, 10, 32)
    h.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = BERT(tiny()).eval()
    ids = torch.randint(1, 99, (2, 7))
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 7), torch.zeros(2, 5)], dim=1)
    with torch.no_grad():
        a = model(ids)
        b = model(padded, attention_mask=mask)[:, :7]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_attention_bias_matches_hand_softmax():
    # one layer's attention by hand: softmax(QKᵀ/√d + M) V with M = -inf on padded keys
    torch.manual_seed(0)
    model = BERT(tiny(layers=1, dropout=0.0, attention_dropout=0.0)).eval()
    attn = model.layers[0].attn
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    q = attn.query(x).view(2, 5, 4, 8).transpose(1, 2)
    k = attn.key(x).view(2, 5, 4, 8).transpose(1, 2)
    v = attn.value(x).view(2, 5, 4, 8).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    expected = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32))
    with torch.no_grad():
        got = attn(x, mask)
    torch.testing.assert_close(got, expected.detach(), atol=1e-6, rtol=1e-5)


def test_all_padding_rows_and_bf16_autocast_stay_finite():
    torch.manual_seed(0)
    model = BERT(tiny()).eval()
    ids = torch.randint(1, 99, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert attention_bias(mask, torch.bfloat16).isfinite().all()
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids, attention_mask=mask)
    assert full.isfinite().all() and low.isfinite().all()
    # bf16 keeps 8 bits of mantissa: LayerNorm-scale outputs agree to a few hundredths
    torch.testing.assert_close(low[0, :4].float(), full[0, :4], atol=0.1, rtol=0)


def parameter_count(cfg: BERTConfig) -> int:
    """Parameters of the bare encoder (and its pooler, if any) from the config alone, by hand."""
    H, F_, V, L = cfg.hidden, cfg.intermediate, cfg.vocab_size or 0, cfg.layers
    embeddings = (V + cfg.max_position + cfg.type_vocab_size) * H + 2 * H
    layer = 4 * (H * H + H) + (H * F_ + F_) + (F_ * H + H) + 4 * H
    return embeddings + L * layer + (H * H + H if cfg.pooler else 0)


def test_parameter_count_by_hand():
    for cfg in (tiny(), tiny(pooler=True)):
        assert n_parameters(BERT(cfg)) == parameter_count(cfg)
    # tiny config by hand: embeddings (99+64+2)·32 + 64;
    # per layer 4·(32·32+32) + (32·37+37) + (37·32+32) + 4·32
    assert parameter_count(tiny()) == (99 + 64 + 2) * 32 + 64 + 2 * (4 * 1056 + 1221 + 1216 + 128)


def test_build_picks_head_from_target():
    cfg = tiny()
    clf = build(cfg, info("classification"))
    assert isinstance(clf, SequenceClassifier) and clf.head.out_features == 3
    reg = build(cfg, info("regression"))
    assert isinstance(reg, SequenceClassifier) and reg.head.out_features == 1
    tok = build(cfg, info("token_classification"))
    assert isinstance(tok, TokenClassifier)
    mlm = build(cfg, info("masked_lm"))
    assert isinstance(mlm, BERTMaskedLM)
    assert isinstance(build(cfg, info("encoder")), BERT)
    ids = torch.randint(1, 99, (2, 6))
    assert clf(ids).shape == (2, 3)
    assert reg(ids).shape == (2, 1)
    assert tok(ids).shape == (2, 6, 3)
    assert mlm(ids).shape == (2, 6, 99)


def test_mlm_decoder_is_tied_to_word_embeddings():
    torch.manual_seed(0)
    mlm = build(tiny(dropout=0.0, attention_dropout=0.0), info("masked_lm")).eval()
    ids = torch.randint(1, 99, (2, 6))
    with torch.no_grad():
        h = mlm.body(ids)
        t = mlm.transform_norm(F.gelu(mlm.transform(h)))
        expected = t @ mlm.body.embeddings.word.weight.T + mlm.bias
        torch.testing.assert_close(mlm(ids), expected, atol=1e-6, rtol=1e-5)
    names = [n for n, _ in mlm.named_parameters()]
    assert not any("decoder" in n for n in names)  # one tensor, not a copy


def test_mlm_treats_pad_id_as_padding():
    torch.manual_seed(0)
    mlm = build(tiny(), info("masked_lm")).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(mlm(ids)[:, :3], mlm(ids[:, :3]), atol=1e-5, rtol=1e-5)


def test_vocab_from_info_and_config_round_trip():
    cfg = load_config(
        {"task": "classification", "model": {"arch": "bert", "hidden": 32, "heads": 4, "layers": 1}}
    )
    assert isinstance(cfg.model, BERTConfig) and cfg.model.vocab_size is None
    model = build_model(cfg.model, info())
    assert model.body.embeddings.word.num_embeddings == 99
    again = load_config(cfg.to_dict())
    assert again.model == cfg.model


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    a = build(tiny(), info()).eval()
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = build(tiny(), info()).eval()
    b.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    ids = torch.randint(1, 99, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(b(ids), a(ids), atol=0, rtol=0)


def test_errors():
    with pytest.raises(ZerotuneError, match="model.hidden .* divisible by model.heads"):
        load_config({"model": {"arch": "bert", "hidden": 30, "heads": 4}})
    with pytest.raises(ZerotuneError, match="model.vocab_size"):
        build(BERTConfig(hidden=32, heads=4), DataInfo("tokens", [8]))
    with pytest.raises(ZerotuneError, match="task 'causal_lm'"):
        build(tiny(), info("causal_lm"))
    with pytest.raises(ZerotuneError, match="input_ids: sequence length 65 exceeds model.max_position 64"):
        BERT(tiny())(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ZerotuneError, match="model.pooler"):
        BERT(tiny()).pooled_output(torch.zeros(1, 2, 32))
