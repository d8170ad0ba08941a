"""Weight initialisation schemes chosen in the config (``model.init``).

    default          PyTorch's own per-layer init (Kaiming-uniform with a=√5 for Linear/Conv,
                     U(-1/√H, 1/√H) for RNN/LSTM/GRU, N(0, 1) for Embedding)
    xavier_uniform   W ~ U(-a, a),  a = gain·√(6 / (fan_in + fan_out))       (Glorot & Bengio, 2010)
    xavier_normal    W ~ N(0, σ²),  σ = gain·√(2 / (fan_in + fan_out))
    he_uniform       W ~ U(-a, a),  a = √(6 / fan_in)                          (He et al., 2015)
    he_normal        W ~ N(0, σ²),  σ = √(2 / fan_in)
    normal(STD)      W ~ N(0, STD²), e.g. ``normal(0.02)``

What each scheme touches (everything except ``default``):

    Linear, Conv1d/2d       weight by the scheme, bias = 0
    RNN / LSTM / GRU        every ``weight_ih_l*`` and ``weight_hh_l*`` (and ``_reverse``) by the
                            scheme, one gate block at a time: an LSTM's (4H, F) ``weight_ih`` is
                            four (H, F) matrices, so fan_out = H, not 4H; biases = 0
    Embedding               normal(STD): N(0, STD²); *_normal: N(0, 1); *_uniform: U(-0.1, 0.1);
                            the ``padding_idx`` row stays 0
    BatchNorm / LayerNorm   untouched (weight 1, bias 0)

gain is 1 (the schemes are named for the layer, not the activation after it).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from zerotune.errors import ZerotuneError

SCHEMES = ("default", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "normal(STD)")
_NORMAL = re.compile(r"^normal\(\s*([0-9.eE+-]+)\s*\)$")


def _normal_std(scheme: str) -> float | None:
    """The STD of ``normal(STD)``, or None when ``scheme`` is not of that form (or STD is not > 0)."""
    m = _NORMAL.match(scheme)
    if not m:
        return None
    try:
        std = float(m.group(1))
    except ValueError:
        return None
    return std if std > 0 else None


def check_scheme(scheme: str) -> str:
    """Validate an init scheme name (used by the model configs; raises ValueError for pydantic)."""
    if scheme in SCHEMES[:-1] or _normal_std(scheme) is not None:
        return scheme
    raise ValueError(f"unknown init scheme; choose from {', '.join(SCHEMES)} (STD > 0)")


def _fill(w: torch.Tensor, scheme: str) -> None:
    """Initialise one weight matrix (or conv kernel) in place with ``scheme``."""
    std = _normal_std(scheme)
    if std is not None:
        nn.init.normal_(w, 0.0, std)
    elif scheme == "xavier_uniform":
        nn.init.xavier_uniform_(w)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(w)
    elif scheme == "he_uniform":
        nn.init.kaiming_uniform_(w, nonlinearity="relu")
    elif scheme == "he_normal":
        nn.init.kaiming_normal_(w, nonlinearity="relu")


@torch.no_grad()
def init_weights(module: nn.Module, scheme: str) -> None:
    """Re-initialise every Linear/Conv/RNN/Embedding weight in ``module`` with ``scheme``.

    Raises:
        ZerotuneError: ``scheme`` is not one of :data:`SCHEMES`.
    """
    try:
        check_scheme(scheme)
    except ValueError as e:
        raise ZerotuneError(f"model.init: {scheme!r}: {e}") from None
    if scheme == "default":
        return
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            _fill(layer.weight, scheme)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.RNNBase):
            gates = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}[layer.mode]
            for name, p in layer.named_parameters(recurse=False):
                if name.startswith(("weight_ih_l", "weight_hh_l")):
                    for block in p.chunk(gates, dim=0):  # views: each gate's (H, ·) matrix
                        _fill(block, scheme)
                elif name.startswith("bias_"):
                    nn.init.zeros_(p)
        elif isinstance(layer, nn.Embedding):
            std = _normal_std(scheme)
            w = layer.weight
            if std is not None:
                nn.init.normal_(w, 0.0, std)
            elif "normal" in scheme:
                nn.init.normal_(w, 0.0, 1.0)
            else:
                nn.init.uniform_(w, -0.1, 0.1)
            if layer.padding_idx is not None:
                w[layer.padding_idx].zero_()
