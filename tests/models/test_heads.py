"""Task heads: pooling by hand, bodies with or without a mask argument, head replacement, MiniLM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.finetune.freeze import train_head_only
from zerotune.interop.hf import load_pretrained
from zerotune.models.bert import BERT, BERTConfig
from zerotune.models.heads import (
    SequenceClassifier,
    TokenClassifier,
    pool,
    replace_head,
)
from zerotune.models.mlp import MLP


class EmbeddingBody(nn.Module):
    """A body without an attention_mask argument (like a causal decoder): position-wise embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids)  # (B, T, 4)


def test_pooling_by_hand():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(h, mask, "cls"), h[:, 0])
    torch.testing.assert_close(pool(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))
    torch.testing.assert_close(pool(h, mask, "last"), torch.stack([h[0, 1], h[1, 3]]))
    torch.testing.assert_close(pool(h, None, "last"), h[:, -1])
    torch.testing.assert_close(pool(h, None, "mean"), h.mean(1))


def test_last_token_pooling_on_a_maskless_body_uses_pad_id():
    torch.manual_seed(0)
    clf = SequenceClassifier(EmbeddingBody(), hidden=4, n_outputs=3, pooling="last", pad_id=0)
    ids = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]])
    emb = clf.body.emb.weight
    expected = torch.stack([emb[7], emb[9]]) @ clf.head.weight.T + clf.head.bias
    torch.testing.assert_close(clf(ids), expected)


def test_classifier_on_bert_ignores_padding():
    torch.manual_seed(0)
    body = BERT(BERTConfig(vocab_size=30, hidden=16, layers=1, heads=2, intermediate=20, max_position=16))
    clf = SequenceClassifier(body, 16, 2, pooling="mean", pad_id=0).eval()
    ids = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[3, 4, 5, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(clf(padded), clf(ids), atol=1e-5, rtol=1e-5)
    reg = SequenceClassifier(body, 16, 1, pooling="cls", pad_id=0)  # a regression head: one value
    assert reg(ids).shape == (1, 1)
    tok = TokenClassifier(body, 16, 5, pad_id=0)
    assert tok(padded).shape == (1, 6, 5)


def test_replace_head_keeps_the_rest():
    torch.manual_seed(0)
    mlp = MLP(6, 3, [5, 4])
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    assert replace_head(mlp, 7) == "net.5"
    x = torch.randn(2, 6)
    assert mlp(x).shape == (2, 7)
    after = mlp.state_dict()
    for k, v in before.items():
        if not k.startswith("net.5."):
            assert torch.equal(after[k], v)
    clf = SequenceClassifier(EmbeddingBody(), 4, 2, pooling="mean")
    assert replace_head(clf, 5) == "head" and clf.head.out_features == 5


def test_errors():
    with pytest.raises(ZerotuneError, match="pooling: unknown pooling 'max'"):
        SequenceClassifier(EmbeddingBody(), 4, 2, pooling="max")
    with pytest.raises(ZerotuneError, match="n_outputs"):
        SequenceClassifier(EmbeddingBody(), 4, 0)
    with pytest.raises(ZerotuneError, match="no nn.Linear layer"):
        replace_head(EmbeddingBody(), 3)


POSITIVE = [
    "what a wonderful day", "i love this film", "the food was delicious", "a truly great performance",
    "she is happy and kind", "this is excellent work", "we had a lovely time",
    "brilliant and beautiful music",
]  # fmt: skip
NEGATIVE = [
    "what a horrible day", "i hate this film", "the food was disgusting", "a truly awful performance",
    "he is angry and cruel", "this is terrible work", "we had a miserable time", "ugly and boring music",
]  # fmt: skip


def test_minilm_classifier_head_learns_a_tiny_text_task():
    torch.manual_seed(0)
    encoder, tok, info = load_pretrained("minilm")
    tok.enable_padding(pad_id=info["pad_id"], pad_token="[PAD]")
    enc = tok.encode_batch(POSITIVE + NEGATIVE)
    ids = torch.tensor([e.ids for e in enc])  # (16, T), right-padded with pad_id
    y = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    model = SequenceClassifier(encoder, info["hidden"], 2, info["pooling"], info["pad_id"]).eval()
    assert train_head_only(model) == 384 * 2 + 2
    # the body is frozen and deterministic in eval mode, so its pooled features are computed once
    # (a full MiniLM forward per step would take most of the test budget on a 2-core CPU)
    with torch.no_grad():
        mask = (ids != info["pad_id"]).long()
        features = pool(model.body(ids, attention_mask=mask), mask, model.pooling)  # (16, 384)
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model.head(features), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = model(ids)  # the whole classifier, end to end
    torch.testing.assert_close(logits, model.head(features).detach(), atol=1e-5, rtol=1e-5)
    accuracy = (logits.argmax(-1) == y).float().mean().item()
    assert accuracy == 1.0, f"train accuracy {accuracy}, final loss {loss.item():.3f}"
