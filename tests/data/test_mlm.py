"""BERT masking rule: binomial proportions, specials untouched, labels, determinism, errors."""

from __future__ import annotations

import math

import pytest
import torch

from zerotune.data.mlm import IGNORE_INDEX, mask_tokens
from zerotune.errors import ZerotuneError

V, PAD, CLS, SEP, MASK = 1000, 0, 1, 2, 3
SPECIALS = [PAD, CLS, SEP]


def make_batch(b: int = 256, t: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(4, V, (b, t), generator=g)  # ordinary tokens, never [MASK]
    ids[:, 0] = CLS
    ids[:, -1] = SEP
    ids[: b // 2, -50:] = PAD  # padding at the end of half the rows
    return ids


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """|count − np| ≤ 5σ for a Binomial(n, p): fails by chance with probability < 1e-6."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_proportions_follow_the_bert_rule():
    ids = make_batch()
    inputs, labels = mask_tokens(
        ids, vocab_size=V, mask_id=MASK, special_ids=SPECIALS, generator=torch.Generator().manual_seed(0)
    )
    candidates = ~torch.isin(ids, torch.tensor(SPECIALS))
    chosen = labels != IGNORE_INDEX
    n, k = int(candidates.sum()), int(chosen.sum())
    assert within(k, n, 0.15), (k, n)
    became_mask = int((inputs[chosen] == MASK).sum())
    unchanged = int((inputs[chosen] == ids[chosen]).sum())
    other = k - became_mask - unchanged
    # a random replacement lands on [MASK] or on the original token with probability 1/V each
    assert within(became_mask, k, 0.8 + 0.1 / V)
    assert within(unchanged, k, 0.1 + 0.1 / V)
    assert within(other, k, 0.1 * (1 - 2 / V))


def test_labels_and_untouched_positions():
    ids = make_batch(32, 64)
    inputs, labels = mask_tokens(
        ids, vocab_size=V, mask_id=MASK, special_ids=SPECIALS, generator=torch.Generator().manual_seed(1)
    )
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else is touched
    special = torch.isin(ids, torch.tensor(SPECIALS))
    assert not chosen[special].any() and torch.equal(inputs[special], ids[special])
    assert inputs.min() >= 0 and inputs.max() < V
    assert ids.equal(make_batch(32, 64))  # the input is not modified in place


def test_deterministic_for_a_generator():
    ids = make_batch(8, 32)
    a = mask_tokens(
        ids, vocab_size=V, mask_id=MASK, special_ids=SPECIALS, generator=torch.Generator().manual_seed(7)
    )
    b = mask_tokens(
        ids, vocab_size=V, mask_id=MASK, special_ids=SPECIALS, generator=torch.Generator().manual_seed(7)
    )
    c = mask_tokens(
        ids, vocab_size=V, mask_id=MASK, special_ids=SPECIALS, generator=torch.Generator().manual_seed(8)
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_errors():
    ids = make_batch(2, 8)
    with pytest.raises(ZerotuneError, match="mask probability p"):
        mask_tokens(ids, vocab_size=V, mask_id=MASK, special_ids=SPECIALS, p=1.5)
    with pytest.raises(ZerotuneError, match="mask_id 1000 is outside the vocabulary of size 1000"):
        mask_tokens(ids, vocab_size=V, mask_id=V, special_ids=SPECIALS)
    with pytest.raises(ZerotuneError, match="integer tensor"):
        mask_tokens(ids.float(), vocab_size=V, mask_id=MASK, special_ids=SPECIALS)
