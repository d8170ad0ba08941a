"""Init schemes: bounds and standard deviations against the formulas, per-gate RNN init, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from zerotune.config import load_config
from zerotune.errors import ZerotuneError
from zerotune.models.init import check_scheme, init_weights

# Sample statistics of n ≈ 10⁵ draws: the standard error of a std estimate is σ/√(2n) ≈ 0.2%,
# so 3% is far outside chance and far inside any wrong formula (the closest wrong one, fan_out
# 4H instead of H, is off by more than 30%).
STAT = {"rtol": 0.03, "atol": 0.0}


def _std(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().std()


@pytest.mark.parametrize(
    "scheme, expected_std",
    [
        ("xavier_uniform", math.sqrt(6 / (400 + 300)) / math.sqrt(3)),
        ("xavier_normal", math.sqrt(2 / (400 + 300))),
        ("he_uniform", math.sqrt(6 / 400) / math.sqrt(3)),
        ("he_normal", math.sqrt(2 / 400)),
        ("normal(0.02)", 0.02),
    ],
)
def test_linear_weight_std_and_zero_bias(scheme, expected_std):
    torch.manual_seed(0)
    layer = nn.Linear(400, 300)
    init_weights(layer, scheme)
    torch.testing.assert_close(_std(layer.weight), torch.tensor(expected_std, dtype=torch.float64), **STAT)
    assert torch.count_nonzero(layer.bias) == 0


def test_uniform_bounds():
    torch.manual_seed(0)
    layer = nn.Linear(400, 300)
    init_weights(layer, "he_uniform")
    bound = math.sqrt(6 / 400)
    assert layer.weight.abs().max() <= bound
    assert layer.weight.abs().max() > 0.99 * bound


def test_conv_fan_in_counts_the_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 64, 5)
    init_weights(conv, "he_normal")
    expected = math.sqrt(2 / (16 * 5 * 5))
    torch.testing.assert_close(_std(conv.weight), torch.tensor(expected, dtype=torch.float64), **STAT)


@pytest.mark.parametrize("cell, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_weights_per_gate(cell, gates):
    """Each gate's (H, F) block gets xavier with fan_out = H, in every layer and direction."""
    torch.manual_seed(0)
    f, h = 60, 40
    rnn = cell(f, h, num_layers=2, bidirectional=True)
    init_weights(rnn, "xavier_uniform")
    names = [n for n, _ in rnn.named_parameters() if n.startswith("weight_")]
    assert len(names) == 8  # ih and hh × 2 layers × 2 directions
    for name, p in rnn.named_parameters():
        if name.startswith("bias_"):
            assert torch.count_nonzero(p) == 0, name
            continue
        fan_in = p.shape[1]
        bound = math.sqrt(6 / (fan_in + h))
        for block in p.chunk(gates):
            assert block.abs().max() <= bound, name
            # PyTorch's own U(-1/√H, 1/√H) would never come this close to a larger bound
            assert block.abs().max() > 0.98 * bound, name
            expected = torch.tensor(bound / math.sqrt(3), dtype=torch.float64)
            torch.testing.assert_close(_std(block), expected, rtol=0.1, atol=0.0)  # 2,400+ draws per block


def test_recurrent_normal_scheme():
    torch.manual_seed(0)
    lstm = nn.LSTM(50, 64)
    init_weights(lstm, "normal(0.1)")
    for p in (lstm.weight_ih_l0, lstm.weight_hh_l0):
        torch.testing.assert_close(_std(p), torch.tensor(0.1, dtype=torch.float64), **STAT)


@pytest.mark.parametrize(
    "scheme, check",
    [
        ("normal(0.5)", lambda w: abs(_std(w) - 0.5) < 0.015),
        ("he_normal", lambda w: abs(_std(w) - 1.0) < 0.03),
        ("xavier_uniform", lambda w: w.abs().max() <= 0.1),
    ],
)
def test_embedding_schemes_keep_the_padding_row_zero(scheme, check):
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 32, padding_idx=3)
    init_weights(emb, scheme)
    assert torch.count_nonzero(emb.weight[3]) == 0
    rest = torch.cat([emb.weight[:3], emb.weight[4:]])
    assert check(rest)


def test_default_leaves_pytorch_init_alone():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.LSTM(3, 2))
    torch.manual_seed(0)
    b = nn.Sequential(nn.Linear(4, 3), nn.LSTM(3, 2))
    init_weights(b, "default")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_norm_layers_untouched():
    norm = nn.BatchNorm1d(5)
    init_weights(nn.Sequential(nn.Linear(5, 5), norm), "normal(0.3)")
    assert torch.equal(norm.weight, torch.ones(5)) and torch.equal(norm.bias, torch.zeros(5))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("scheme", ["orthogonal", "normal(-1)", "normal(0)", "normal(1e)", "normal()", ""])
def test_bad_scheme(scheme):
    with pytest.raises(ValueError, match="unknown init scheme"):
        check_scheme(scheme)
    with pytest.raises(ZerotuneError, match=rf"^model\.init: {re.escape(repr(scheme))}: unknown init scheme"):
        init_weights(nn.Linear(2, 2), scheme)


def test_bad_scheme_in_a_config_file_names_the_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  arch: rnn\n  init: normal(abc)\n")
    with pytest.raises(ZerotuneError, match=rf"^{path}: model\.init: unknown init scheme"):
        load_config(path)
