"""Task heads that sit on a body returning hidden states, and head replacement for classic nets.

A *body* is any module ``body(input_ids, ...) -> (B, T, H)``: the BERT encoder, a GPT
decoder, an RNN. Which tokens are real comes from ``attention_mask`` (1 = real, 0 = padding)
or, when that is not given, from ``input_ids != pad_id``.

Pooling turns (B, T, H) into one vector per sequence, with m the real-token mask:

    mean   p = Σₜ mₜ hₜ / Σₜ mₜ                       (sentence embeddings, MiniLM style)
    cls    p = h₀                                     (the [CLS] position of an encoder)
    last   p = h_{t*},  t* = max{t : mₜ = 1}          (the last real token of a decoder)

then the head is one linear layer: ``logits = W dropout(p) + b`` with W ∈ ℝ^{n_outputs × H}.
A regression head is the same layer trained with a squared-error loss (n_outputs values).
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch import nn

from zerotune.errors import ZerotuneError

Pooling = Literal["mean", "cls", "last"]
POOLINGS = ("mean", "cls", "last")


def real_token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int | None
) -> torch.Tensor | None:
    """The (B, T) mask of real tokens (1 real, 0 padding), or None when every token is real."""
    if attention_mask is not None:
        return attention_mask
    if pad_id is not None:
        return (input_ids != pad_id).long()  # (B, T)
    return None


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Pool hidden states (B, T, H) into (B, H) over the real tokens given by ``mask`` (B, T)."""
    if pooling == "cls":
        return hidden[:, 0]  # (B, H)
    if pooling == "mean":
        if mask is None:
            return hidden.mean(dim=1)
        m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, H)
    if pooling == "last":
        if mask is None:
            return hidden[:, -1]
        # index of the last real token; works for right padding and for no padding
        positions = torch.arange(hidden.shape[1], device=hidden.device)  # (T,)
        last = (mask.bool() * positions).amax(dim=1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    raise ZerotuneError(f"pooling: unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")


def _accepts_mask(body: nn.Module) -> bool:
    return "attention_mask" in inspect.signature(body.forward).parameters


class SequenceClassifier(nn.Module):
    """One label (or value) per sequence: body → pool over real tokens → dropout → linear.

    Args:
        body: module mapping input ids (B, T) to hidden states (B, T, H).
        hidden: H, the width of the body's output.
        n_outputs: number of classes (or regression targets).
        pooling: ``mean`` over real tokens, ``cls`` (first token) or ``last`` (last real token).
        pad_id: padding id used to find real tokens when no attention mask is passed.
        dropout: dropout on the pooled vector before the linear layer.

    Example:
        >>> clf = SequenceClassifier(encoder, hidden=384, n_outputs=2, pooling="mean", pad_id=0)
        >>> logits = clf(input_ids)  # (B, 2)
    """

    def __init__(
        self,
        body: nn.Module,
        hidden: int,
        n_outputs: int,
        pooling: Pooling = "mean",
        pad_id: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ZerotuneError(f"pooling: unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        if n_outputs < 1:
            raise ZerotuneError(f"n_outputs: expected at least 1, got {n_outputs}")
        self.body = body
        self.pooling = pooling
        self.pad_id = pad_id
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_outputs)
        self._body_takes_mask = _accepts_mask(body)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = real_token_mask(input_ids, attention_mask, self.pad_id)  # (B, T) or None
        if self._body_takes_mask:
            h = self.body(input_ids, attention_mask=mask)  # (B, T, H)
        else:
            h = self.body(input_ids)  # (B, T, H); a causal body never looks at later padding
        return self.head(self.dropout(pool(h, mask, self.pooling)))  # (B, n_outputs)


class TokenClassifier(nn.Module):
    """One label per token (tagging): body → dropout → linear on every position, (B, T, n_outputs)."""

    def __init__(
        self, body: nn.Module, hidden: int, n_outputs: int, pad_id: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if n_outputs < 1:
            raise ZerotuneError(f"n_outputs: expected at least 1, got {n_outputs}")
        self.body = body
        self.pad_id = pad_id
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_outputs)
        self._body_takes_mask = _accepts_mask(body)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = real_token_mask(input_ids, attention_mask, self.pad_id)
        h = self.body(input_ids, attention_mask=mask) if self._body_takes_mask else self.body(input_ids)
        return self.head(self.dropout(h))  # (B, T, n_outputs)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` registered in ``model`` (its output layer for an MLP/CNN/classifier)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ZerotuneError(f"{type(model).__name__} has no nn.Linear layer to replace")
    return found[-1]


def replace_head(model: nn.Module, n_outputs: int) -> str:
    """Replace the last ``nn.Linear`` of ``model`` by a freshly initialised one with ``n_outputs`` outputs.

    Used to fine-tune a classic net (MLP, CNN) or a sequence classifier on a new label set:
    every other layer keeps its trained weights.

    Returns:
        The name of the replaced module (e.g. ``net.4`` or ``head``).
    """
    if n_outputs < 1:
        raise ZerotuneError(f"n_outputs: expected at least 1, got {n_outputs}")
    name, old = last_linear(model)
    new = nn.Linear(old.in_features, n_outputs, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    model.set_submodule(name, new)
    return name
