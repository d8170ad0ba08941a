"""Multi-layer perceptron.

For input x (flattened to F features) and hidden sizes h₁…h_L:

    a₀ = x
    aᵢ = Dropout(σ(Norm(Wᵢ aᵢ₋₁ + bᵢ)))      i = 1…L,   Wᵢ ∈ ℝ^{hᵢ × hᵢ₋₁}
    y  = W_out a_L + b_out                   logits (classification) or value (regression)

σ is the activation (relu, gelu, tanh, sigmoid, silu); Norm is optional batch or layer norm.
The classic MNIST net is ``hidden: [64, 64]`` on 784 inputs: 784→64→64→10.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.models.init import check_scheme, init_weights
from zerotune.spec import DataInfo

Activation = Literal["relu", "gelu", "tanh", "sigmoid", "silu"]
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
}


def check_hidden(sizes: list[int]) -> list[int]:
    """Validate hidden layer widths (an empty list means no hidden layer); shared by the model configs."""
    if any(h < 1 for h in sizes):
        raise ValueError("hidden sizes must be ≥ 1")
    return sizes


class MLPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    activation: Activation = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    norm: Literal["none", "batch", "layer"] = "none"
    init: str = "default"

    _check_init = field_validator("init")(lambda cls, v: check_scheme(v))

    _check_hidden = field_validator("hidden")(lambda cls, v: check_hidden(v))


class MLP(nn.Module):
    def __init__(
        self,
        n_inputs: int,
        n_outputs: int,
        hidden: list[int],
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = n_inputs
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(h))
            elif norm == "layer":
                layers.append(nn.LayerNorm(h))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, ...) -> (B, n_outputs)


def build(cfg: MLPConfig, info: DataInfo) -> MLP:
    if info.kind == "tokens":
        raise ZerotuneError("model.arch: an mlp reads numbers, not token ids; text needs rnn, bert or gpt (or "
                            "`zerotune finetune --from minilm`)")
    model = MLP(math.prod(info.input_shape), info.n_outputs, cfg.hidden, cfg.activation, cfg.dropout, cfg.norm)
    init_weights(model, cfg.init)
    return model
