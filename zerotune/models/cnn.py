"""Convolutional networks for images: a conv stack (``arch: cnn``) and a small ResNet (``arch: resnet``).

A 2-D convolution with kernel K maps C_in channels to C_out:

    y[c, i, j] = b[c] + Σ_{c'} Σ_{u,v < K} W[c, c', u, v] · x[c', i + u - K//2, j + v - K//2]

(zero "same" padding, so H×W is kept). ``cnn`` stacks stages; stage s is

    h = Dropout(Pool₂ₓ₂(σ(Norm(Conv(… σ(Norm(Conv(h))) …)))))   convs_per_stage convs, channels[s] wide

then a readout (``flatten`` the C×H×W map, or a global average/max over H×W) and the head:
Dropout → Linear → σ for each ``hidden`` width, then Dropout → Linear to the logits. The
classic Keras MNIST convnet is close to ``channels: [32, 64]``, max pooling, flatten.

``resnet`` is the CIFAR ResNet of He et al. (2016, https://arxiv.org/abs/1512.03385, §4.2):
a 3×3 stem, then for each stage s (``widths[s]`` channels, ``blocks[s]`` basic blocks, stride 2
from the second stage on) the basic block

    F(x) = BN(Conv₃ₓ₃(σ(BN(Conv₃ₓ₃,stride(x)))))
    y    = σ(F(x) + S(x))      S = identity, or BN(Conv₁ₓ₁,stride) when the shape changes

then global average pooling and the head. Stride-2 3×3 convs give ⌈H/2⌉, so any input size works.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.models.init import check_scheme, init_weights
from zerotune.models.mlp import ACTIVATIONS, Activation, check_hidden
from zerotune.spec import DataInfo


def _positive(name: str):
    def check(cls, v: list[int]) -> list[int]:
        if not v or any(h < 1 for h in v):
            raise ValueError(f"{name} must be a non-empty list of sizes ≥ 1")
        return v

    return check


class CNNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["cnn"] = "cnn"
    channels: list[int] = Field(default_factory=lambda: [32, 64])  # one stage per entry
    kernel: int = Field(3, ge=1)
    convs_per_stage: int = Field(1, ge=1)
    pool: Literal["max", "avg"] = "max"  # 2×2, stride 2, after each stage
    norm: Literal["batch", "none"] = "none"
    activation: Activation = "relu"
    readout: Literal["flatten", "global_avg", "global_max"] = "flatten"
    hidden: list[int] = Field(default_factory=list)  # head MLP widths; [] = linear head
    dropout: float = Field(0.0, ge=0, lt=1)
    init: str = "default"

    _check_init = field_validator("init")(lambda cls, v: check_scheme(v))
    _check_channels = field_validator("channels")(_positive("channels"))

    _check_hidden = field_validator("hidden")(lambda cls, v: check_hidden(v))


class ResNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["resnet"] = "resnet"
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64])
    blocks: list[int] = Field(default_factory=lambda: [2, 2, 2])
    activation: Activation = "relu"
    hidden: list[int] = Field(default_factory=list)  # head MLP widths after pooling; [] = linear head
    dropout: float = Field(0.0, ge=0, lt=1)  # before each head layer
    init: str = "default"

    _check_init = field_validator("init")(lambda cls, v: check_scheme(v))
    _check_widths = field_validator("widths")(_positive("widths"))
    _check_blocks = field_validator("blocks")(_positive("blocks"))

    _check_hidden = field_validator("hidden")(lambda cls, v: check_hidden(v))

    @field_validator("blocks")
    @classmethod
    def _same_length(cls, v: list[int], info: ValidationInfo) -> list[int]:
        widths = info.data.get("widths")
        if widths is not None and len(widths) != len(v):
            raise ValueError(f"needs one entry per stage in widths ({len(widths)}), got {len(v)}")
        return v


def head(width: int, hidden: list[int], n_outputs: int, activation: str, dropout: float) -> nn.Sequential:
    """Dropout → Linear → σ for each hidden width, then Dropout → Linear to the outputs."""
    layers: list[nn.Module] = []
    for h in hidden:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, n_outputs))
    return nn.Sequential(*layers)


def _image_shape(info: DataInfo, arch: str) -> tuple[int, int, int]:
    if info.kind != "image" or len(info.input_shape) != 3:
        raise ZerotuneError(
            f"model.arch: {arch} needs image data (C, H, W), "
            f"got {info.kind} data of shape {list(info.input_shape)}"
        )
    c, h, w = (int(s) for s in info.input_shape)
    return c, h, w


# ---------------------------------------------------------------- plain conv stack


class CNN(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, int, int],
        n_outputs: int,
        channels: list[int],
        kernel: int = 3,
        convs_per_stage: int = 1,
        pool: str = "max",
        norm: str = "none",
        activation: str = "relu",
        readout: str = "flatten",
        hidden: list[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        stages: list[nn.Module] = []
        for s, width in enumerate(channels):
            if h < 2 or w < 2:
                raise ZerotuneError(
                    f"model.channels: {len(channels)} stages of 2×2 pooling shrink the {input_shape[1]}×"
                    f"{input_shape[2]} input to nothing at stage {s + 1}; use fewer stages"
                )
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                # a bias before BatchNorm is cancelled by its mean subtraction
                layers.append(nn.Conv2d(c, width, kernel, padding="same", bias=norm == "none"))
                if norm == "batch":
                    layers.append(nn.BatchNorm2d(width))
                layers.append(ACTIVATIONS[activation]())
                c = width
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            stages.append(nn.Sequential(*layers))
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*stages)
        if readout == "flatten":
            self.readout = nn.Flatten()
            width = c * h * w
        else:
            pooler = nn.AdaptiveAvgPool2d(1) if readout == "global_avg" else nn.AdaptiveMaxPool2d(1)
            self.readout = nn.Sequential(pooler, nn.Flatten())
            width = c
        self.head = head(width, hidden or [], n_outputs, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C, H/2^S, W/2^S)
        x = self.readout(x)  # (B, C·H'·W') or (B, C)
        return self.head(x)  # (B, n_outputs)


# ---------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm and a shortcut: y = σ(F(x) + S(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = ACTIVATIONS[activation]()
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))  # (B, C_out, H', W')
        out = self.bn2(self.conv2(out))  # (B, C_out, H', W')
        return self.act(out + self.shortcut(x))  # (B, C_out, H', W')


class ResNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        n_outputs: int,
        widths: list[int],
        blocks: list[int],
        activation: str = "relu",
        hidden: list[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            ACTIVATIONS[activation](),
        )
        stages: list[nn.Module] = []
        c = widths[0]
        for s, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if s == 0 else 2
            stage = [BasicBlock(c, width, stride, activation)]
            stage += [BasicBlock(width, width, 1, activation) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            c = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = head(c, hidden or [], n_outputs, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, widths[0], H, W)
        x = self.stages(x)  # (B, widths[-1], H/2^(S-1), W/2^(S-1))
        x = self.pool(x)  # (B, widths[-1])
        return self.head(x)  # (B, n_outputs)


def build(cfg: CNNConfig, info: DataInfo) -> CNN:
    model = CNN(
        _image_shape(info, "cnn"),
        info.n_outputs,
        cfg.channels,
        cfg.kernel,
        cfg.convs_per_stage,
        cfg.pool,
        cfg.norm,
        cfg.activation,
        cfg.readout,
        cfg.hidden,
        cfg.dropout,
    )
    init_weights(model, cfg.init)
    return model


def build_resnet(cfg: ResNetConfig, info: DataInfo) -> ResNet:
    c, _, _ = _image_shape(info, "resnet")
    model = ResNet(c, info.n_outputs, cfg.widths, cfg.blocks, cfg.activation, cfg.hidden, cfg.dropout)
    init_weights(model, cfg.init)
    return model
