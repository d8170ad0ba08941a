"""Freezing: frozen parameters never move under an optimizer, trainable ones do, counts match hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.finetune.freeze import find_blocks, freeze, freeze_all_but_last, train_head_only, unfreeze
from zerotune.models.bert import BERTConfig, build
from zerotune.models.mlp import MLP
from zerotune.spec import DataInfo

CFG = BERTConfig(vocab_size=99, hidden=32, layers=3, heads=4, intermediate=37, max_position=32, dropout=0.0)
EMB = (99 + 32 + 2) * 32 + 2 * 32  # word + position + type embeddings, LayerNorm
LAYER = 4 * (32 * 32 + 32) + (32 * 37 + 37) + (37 * 32 + 32) + 4 * 32  # attention, ffn, two LayerNorms
HEAD = 32 * 2 + 2


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return build(CFG, DataInfo("tokens", [8], classes=["neg", "pos"], vocab_size=99, pad_id=0))


def train_a_few_steps(model: nn.Module) -> dict[str, torch.Tensor]:
    """Snapshot, run 3 AdamW steps on the trainable parameters, return the snapshot."""
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(1, 99, (4, 8), generator=g), torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), y).backward()
        opt.step()
    return before


def check_moved(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} is trainable but did not change"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"


def test_freeze_by_glob():
    model = classifier()
    assert freeze(model, ["body.embeddings.*", "body.layers.0.*"]) == 2 * LAYER + HEAD
    check_moved(model, train_a_few_steps(model))


def test_freeze_all_but_last():
    model = classifier()
    assert find_blocks(model)[0] == "body.layers"
    assert freeze_all_but_last(model, 1) == LAYER + HEAD
    assert (
        not model.body.embeddings.word.weight.requires_grad
        and model.body.layers[2].ffn.up.weight.requires_grad
    )
    check_moved(model, train_a_few_steps(model))
    assert unfreeze(model) == EMB + 3 * LAYER + HEAD
    assert freeze_all_but_last(model, 0) == HEAD


def test_train_head_only_on_classifier_and_mlp():
    model = classifier()
    assert train_head_only(model) == HEAD
    check_moved(model, train_a_few_steps(model))
    mlp = MLP(10, 3, [8, 8])
    assert train_head_only(mlp) == 8 * 3 + 3
    assert [n for n, p in mlp.named_parameters() if p.requires_grad] == ["net.5.weight", "net.5.bias"]


def test_errors():
    with pytest.raises(ZerotuneError, match=r"freeze: pattern 'encoder.\*' matches no parameter"):
        freeze(classifier(), ["encoder.*"])
    with pytest.raises(ZerotuneError, match="no list of layers"):
        freeze_all_but_last(MLP(4, 2, [3]), 1)
    with pytest.raises(ZerotuneError, match="k must be ≥ 0"):
        freeze_all_but_last(classifier(), -1)
