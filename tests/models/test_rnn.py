"""RNN family: padding invariance, a hand-run LSTM/GRU, input layouts, hand counts, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import n_parameters
from zerotune.config import load_config
from zerotune.errors import ZerotuneError
from zerotune.models.rnn import RNNConfig, build
from zerotune.spec import DataInfo

PAD = 0
TOKENS = DataInfo("tokens", [9], classes=["a", "b", "c"], vocab_size=20, pad_id=PAD)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(info: DataInfo, seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    return build(RNNConfig(**cfg), info).eval()


def _hand_lstm(x: torch.Tensor, lstm: nn.LSTM, suffix: str = "l0") -> torch.Tensor:
    """The LSTM equations run step by step: returns every hₜ, (B, T, H)."""
    w_ih, w_hh = getattr(lstm, f"weight_ih_{suffix}"), getattr(lstm, f"weight_hh_{suffix}")
    b = getattr(lstm, f"bias_ih_{suffix}") + getattr(lstm, f"bias_hh_{suffix}")
    hidden = lstm.hidden_size
    h = x.new_zeros(x.shape[0], hidden)
    c = x.new_zeros(x.shape[0], hidden)
    outs = []
    for t in range(x.shape[1]):
        i, f, g, o = (x[:, t] @ w_ih.T + h @ w_hh.T + b).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1)


def _hand_gru(x: torch.Tensor, gru: nn.GRU) -> torch.Tensor:
    w_ir, w_iz, w_in = gru.weight_ih_l0.chunk(3)
    w_hr, w_hz, w_hn = gru.weight_hh_l0.chunk(3)
    b_ir, b_iz, b_in = gru.bias_ih_l0.chunk(3)
    b_hr, b_hz, b_hn = gru.bias_hh_l0.chunk(3)
    h = x.new_zeros(x.shape[0], gru.hidden_size)
    outs = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        r = torch.sigmoid(xt @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
        z = torch.sigmoid(xt @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
        n = torch.tanh(xt @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs, 1)


# float32 kernels (fused on CPU) against a step-by-step loop: agree to rounding
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_lstm_equals_hand_run_cell(pooling):
    info = DataInfo("sequence", [5, 3], classes=["a", "b"])
    model = _model(info, cell="lstm", hidden=4, pooling=pooling)
    x = torch.randn(2, 5, 3, generator=_gen())
    hs = _hand_lstm(x, model.rnn)  # (B, T, H)
    pooled = hs[:, -1] if pooling == "last" else hs.mean(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(pooled), **TOL)


def test_gru_equals_hand_run_cell():
    info = DataInfo("sequence", [6, 2], classes=["a", "b"])
    model = _model(info, cell="gru", hidden=3)
    x = torch.randn(3, 6, 2, generator=_gen())
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(_hand_gru(x, model.rnn)[:, -1]), **TOL)


def test_bidirectional_last_is_forward_end_and_backward_start():
    info = DataInfo("sequence", [5, 3], classes=["a", "b"])
    model = _model(info, cell="lstm", hidden=4, bidirectional=True)
    x = torch.randn(2, 5, 3, generator=_gen())
    fwd = _hand_lstm(x, model.rnn, "l0")[:, -1]
    bwd = _hand_lstm(x.flip(1), model.rnn, "l0_reverse")[:, -1]  # the reverse pass ends at t = 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(torch.cat([fwd, bwd], 1)), **TOL)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_does_not_change_the_output(cell, bidirectional, pooling):
    model = _model(TOKENS, cell=cell, hidden=5, layers=2, bidirectional=bidirectional, pooling=pooling)
    seq = [3, 7, 1, 12, 5]
    batch = torch.tensor(
        [
            seq + [PAD] * 4,  # right padding
            [PAD] * 4 + seq,  # left padding
            seq[:2] + [PAD, PAD] + seq[2:] + [PAD, PAD],  # pads in the middle
            [4, 4, 9, 9, 2, 8, 6, 19, 11],  # an unpadded neighbour in the same batch
        ]
    )
    with torch.no_grad():
        out = model(batch)
        alone = model(torch.tensor([seq]))  # the bare sequence, T = 5
    for row in range(3):
        torch.testing.assert_close(out[row], alone[0], **TOL)


def test_token_mean_is_over_real_tokens_only():
    model = _model(TOKENS, cell="lstm", hidden=4, embed_dim=3, pooling="mean")
    seq = torch.tensor([[5, 6, 7]])
    hs = _hand_lstm(model.embed(seq), model.rnn)  # (1, 3, H) on the real tokens alone
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7, PAD, PAD, PAD]]))
    torch.testing.assert_close(out, model.head(hs.mean(1)), **TOL)


def test_all_padding_row_gives_finite_output():
    model = _model(TOKENS, hidden=4, pooling="mean")
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(2, 9, dtype=torch.long))).all()


def test_tokens_without_pad_id_use_every_position():
    info = DataInfo("tokens", [4], classes=["a", "b"], vocab_size=10)
    model = _model(info, cell="lstm", hidden=3, embed_dim=2)
    x = torch.tensor([[0, 1, 0, 2]])  # 0 is an ordinary token here
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(_hand_lstm(model.embed(x), model.rnn)[:, -1]), **TOL)


def test_image_rows_become_steps():
    """(B, C, H, W) → (B, H, C·W): step h is channel 0's row h, then channel 1's row h."""
    info = DataInfo("image", [2, 3, 4], classes=["a", "b"])
    model = _model(info, cell="lstm", hidden=3)
    x = torch.randn(2, 2, 3, 4, generator=_gen())
    steps = torch.stack([torch.cat([x[:, 0, h], x[:, 1, h]], 1) for h in range(3)], 1)  # (B, H, C·W)
    assert model.rnn.input_size == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(_hand_lstm(steps, model.rnn)[:, -1]), **TOL)


def test_tabular_features_become_steps():
    info = DataInfo("tabular", [4], target="regression")
    model = _model(info, cell="lstm", hidden=3)
    x = torch.randn(5, 4, generator=_gen())
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, model.head(_hand_lstm(x.unsqueeze(-1), model.rnn)[:, -1]), **TOL)
    assert out.shape == (5, 1)


def test_digits_rnn_shape():
    info = DataInfo("image", [1, 8, 8], classes=[str(i) for i in range(10)])
    model = build(load_config({"model": {"arch": "rnn", "cell": "gru", "hidden": 16}}).model, info)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_hand_parameter_counts():
    """LSTM F=3 → H=4, 2 classes: 4·4·(3 + 4) weights + 2·4·4 biases = 144, head 4·2 + 2 = 10.
    Bidirectional doubles the LSTM (288) and the head reads 8 features (8·2 + 2 = 18)."""
    info = DataInfo("sequence", [5, 3], classes=["a", "b"])
    assert n_parameters(build(RNNConfig(cell="lstm", hidden=4), info)) == 154
    assert n_parameters(build(RNNConfig(cell="lstm", hidden=4, bidirectional=True), info)) == 306
    # GRU, 2 layers on tokens: embedding 20·6; layer 1 3·5·(6+5) + 2·3·5; layer 2 3·5·(5+5) + 30; head 5·3 + 3
    gru = build(RNNConfig(cell="gru", hidden=5, layers=2, embed_dim=6), TOKENS)
    assert n_parameters(gru) == 120 + (165 + 30) + (150 + 30) + 18


def test_dropout_between_layers_only_when_stacked(recwarn):
    info = DataInfo("sequence", [5, 3], classes=["a", "b"])
    assert build(RNNConfig(layers=1, dropout=0.3), info).rnn.dropout == 0  # torch warns otherwise
    assert build(RNNConfig(layers=2, dropout=0.3), info).rnn.dropout == 0.3
    assert not [w for w in recwarn if "dropout" in str(w.message)]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "info, message",
    [
        (DataInfo("tokens", [9], classes=["a"]), r"model\.arch: rnn on token data needs the data's vocab"),
        (DataInfo("tokens", [9], classes=["a"], vocab_size=5, pad_id=5), r"model\.arch: rnn: pad_id 5 is"),
        (DataInfo("sequence", [9], classes=["a"]), r"model\.arch: rnn expects sequence examples with 2 dim"),
        (DataInfo("graph", [9], classes=["a"]), r"model\.arch: rnn cannot read 'graph' data"),
    ],
)
def test_bad_data_info_is_rejected(info, message):
    with pytest.raises(ZerotuneError, match=message):
        build(RNNConfig(), info)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"cell": "transformer"}, r"model\.cell: expected one of 'rnn', 'lstm' or 'gru', got 'transformer'"),
        ({"hidden": 0}, r"model\.hidden: "),
        ({"pooling": "max"}, r"model\.pooling: expected one of 'last' or 'mean'"),
        ({"bidirectional": "sideways"}, r"model\.bidirectional: expected true or false"),
        ({"init": "orthogonal"}, r"model\.init: unknown init scheme"),
    ],
)
def test_bad_config_names_the_key(model, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: rnn\n" + "".join(f"  {k}: {v}\n" for k, v in model.items()))
    with pytest.raises(ZerotuneError, match=rf"^{path}: {message}"):
        load_config(path)
