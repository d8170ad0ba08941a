"""Recurrent networks (``arch: rnn``): Elman RNN, LSTM or GRU over a sequence, then a linear head.

Per time step t, with input xₜ and previous hidden state hₜ₋₁ (σ = logistic, ⊙ = elementwise):

    rnn   hₜ = tanh(W_ih xₜ + b_ih + W_hh hₜ₋₁ + b_hh)
    lstm  [i, f, g, o] = W_ih xₜ + b_ih + W_hh hₜ₋₁ + b_hh
          cₜ = σ(f) ⊙ cₜ₋₁ + σ(i) ⊙ tanh(g)        hₜ = σ(o) ⊙ tanh(cₜ)
    gru   [r, z, n]: r = σ(W_ir xₜ + b_ir + W_hr hₜ₋₁ + b_hr),  z likewise,
          n = tanh(W_in xₜ + b_in + r ⊙ (W_hn hₜ₋₁ + b_hn))       hₜ = (1 - z) ⊙ n + z ⊙ hₜ₋₁

``layers`` cells are stacked (dropout between them); ``bidirectional`` adds a second pass from
the end and concatenates both. The sequence becomes one vector by ``pooling``:

    last   the final hidden state of the top layer (forward: after the last real step;
           backward: after the first), [h→_T ; h←_1]
    mean   (1/T) Σₜ hₜ over the real (non-padding) steps

and y = W_out Dropout(pooled) + b_out. Inputs by data kind:

    tokens    (B, T) ids → Embedding(vocab_size, embed_dim, padding_idx=pad_id) → (B, T, embed_dim);
              padding tokens are removed wherever they sit (left, right or inside) and the rest
              packed with ``pack_padded_sequence``, so pads never change the result
    sequence  (B, T, F) as is
    image     (B, C, H, W) → rows as steps, (B, H, C·W)
    tabular   (B, F) → one feature per step, (B, F, 1)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from zerotune.errors import ZerotuneError
from zerotune.models.init import check_scheme, init_weights
from zerotune.spec import DataInfo

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
_RANK = {"tokens": 1, "sequence": 2, "image": 3, "tabular": 1}


class RNNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["rnn"] = "rnn"
    cell: Literal["rnn", "lstm", "gru"] = "lstm"
    hidden: int = Field(64, ge=1)
    layers: int = Field(1, ge=1)
    bidirectional: bool = False
    embed_dim: int = Field(64, ge=1)  # token inputs only
    pooling: Literal["last", "mean"] = "last"
    dropout: float = Field(0.0, ge=0, lt=1)  # between stacked layers and before the head
    init: str = "default"

    _check_init = field_validator("init")(lambda cls, v: check_scheme(v))


class RNNClassifier(nn.Module):
    """Encode a (B, T, F) sequence (or token ids) with a recurrent stack and pool it to logits."""

    def __init__(
        self,
        kind: str,
        input_shape: list[int],
        n_outputs: int,
        cell: str = "lstm",
        hidden: int = 64,
        layers: int = 1,
        bidirectional: bool = False,
        embed_dim: int = 64,
        pooling: str = "last",
        dropout: float = 0.0,
        vocab_size: int | None = None,
        pad_id: int | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.pooling, self.pad_id = kind, pooling, pad_id
        self.embed: nn.Embedding | None = None
        if kind == "tokens":
            self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
            features = embed_dim
        elif kind == "sequence":
            features = input_shape[1]
        elif kind == "image":
            features = input_shape[0] * input_shape[2]  # C·W per row
        else:  # tabular
            features = 1
        # nn.RNN* only applies dropout between layers, and warns when there is just one
        self.rnn = CELLS[cell](
            features,
            hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
            bidirectional=bidirectional,
        )
        self.directions = 2 if bidirectional else 1
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(self.directions * hidden, n_outputs)

    def _steps(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape the data's own layout into (B, T, F) steps."""
        if self.kind == "image":
            b, c, h, w = x.shape
            return x.permute(0, 2, 1, 3).reshape(b, h, c * w)  # (B, H, C·W)
        if self.kind == "tabular":
            return x.unsqueeze(-1)  # (B, F, 1)
        return x  # (B, T, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = None
        if self.embed is not None:
            x, lengths = self._compact(x)  # (B, T) ids with real tokens first, (B,)
            seq = self.embed(x)  # (B, T, E)
            seq = pack_padded_sequence(seq, lengths.cpu(), batch_first=True, enforce_sorted=False)
        else:
            seq = self._steps(x)  # (B, T, F)
        out, h_n = self.rnn(seq)
        if isinstance(h_n, tuple):  # LSTM: (h_n, c_n)
            h_n = h_n[0]
        if self.pooling == "last":
            # h_n: (layers·D, B, H); the last D rows are the top layer. For packed input the
            # forward state is taken after each sequence's own last real step.
            top = h_n[-self.directions :]  # (D, B, H)
            pooled = top.transpose(0, 1).reshape(top.shape[1], -1)  # (B, D·H)
        elif lengths is not None:
            out, _ = pad_packed_sequence(out, batch_first=True)  # (B, T', D·H), zeros past each length
            pooled = out.sum(1) / lengths.to(out.device, out.dtype).unsqueeze(1)  # (B, D·H)
        else:
            pooled = out.mean(1)  # (B, D·H)
        return self.head(self.drop(pooled))  # (B, n_outputs)

    def _compact(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move each row's real tokens to the front (order kept) and count them."""
        if self.pad_id is None:
            return ids, torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        real = ids != self.pad_id  # (B, T)
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real positions first
        lengths = real.sum(1).clamp_min(1)  # an all-padding row still needs one step
        return ids.gather(1, order), lengths


def build(cfg: RNNConfig, info: DataInfo) -> RNNClassifier:
    if info.kind not in _RANK:
        raise ZerotuneError(
            f"model.arch: rnn cannot read {info.kind!r} data; expected one of {', '.join(_RANK)}"
        )
    if len(info.input_shape) != _RANK[info.kind]:
        raise ZerotuneError(
            f"model.arch: rnn expects {info.kind} examples with {_RANK[info.kind]} dimension(s), "
            f"got input_shape {list(info.input_shape)}"
        )
    if info.kind == "tokens" and not info.vocab_size:
        raise ZerotuneError("model.arch: rnn on token data needs the data's vocab_size, which is not set")
    if info.kind == "tokens" and info.pad_id is not None and not 0 <= info.pad_id < info.vocab_size:
        raise ZerotuneError(
            f"model.arch: rnn: pad_id {info.pad_id} is outside the vocabulary 0..{info.vocab_size - 1}"
        )
    if math.prod(info.input_shape) < 1:
        raise ZerotuneError(f"model.arch: rnn: empty input_shape {list(info.input_shape)}")
    model = RNNClassifier(
        info.kind,
        list(info.input_shape),
        info.n_outputs,
        cfg.cell,
        cfg.hidden,
        cfg.layers,
        cfg.bidirectional,
        cfg.embed_dim,
        cfg.pooling,
        cfg.dropout,
        info.vocab_size,
        info.pad_id,
    )
    init_weights(model, cfg.init)
    return model
