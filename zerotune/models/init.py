"""Weight initialisation schemes chosen in the config (``model.init``).

    default          PyTorch's own per-layer init (Kaiming-uniform with a=√5 for Linear/Conv)
    xavier_uniform   W ~ U(-a, a),  a = gain·√(6 / (fan_in + fan_out))       (Glorot & Bengio, 2010)
    xavier_normal    W ~ N(0, σ²),  σ = gain·√(2 / (fan_in + fan_out))
    he_uniform       W ~ U(-a, a),  a = √(6 / fan_in)                          (He et al., 2015)
    he_normal        W ~ N(0, σ²),  σ = √(2 / fan_in)
    normal(STD)      W ~ N(0, STD²), e.g. ``normal(0.02)``

Schemes apply to the weights of Linear, Conv and Embedding layers; biases start at zero
(except under ``default``). Norm layers keep weight 1, bias 0.
"""

from __future__ import annotations

import re

from torch import nn

SCHEMES = ("default", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "normal(STD)")
_NORMAL = re.compile(r"^normal\(\s*([0-9.eE+-]+)\s*\)$")


def check_scheme(scheme: str) -> str:
    """Validate an init scheme name (used by the model configs)."""
    if scheme in SCHEMES[:-1] or _NORMAL.match(scheme):
        return scheme
    raise ValueError(f"unknown init scheme; choose from {', '.join(SCHEMES)}")


def init_weights(module: nn.Module, scheme: str) -> None:
    """Re-initialise every Linear/Conv/Embedding weight in ``module`` with ``scheme``."""
    check_scheme(scheme)
    if scheme == "default":
        return
    m = _NORMAL.match(scheme)
    for layer in module.modules():
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)):
            continue
        w = layer.weight
        if m:
            nn.init.normal_(w, 0.0, float(m.group(1)))
        elif isinstance(layer, nn.Embedding):
            nn.init.normal_(w, 0.0, 1.0) if "normal" in scheme else nn.init.uniform_(w, -0.1, 0.1)
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(w)
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(w)
        elif scheme == "he_uniform":
            nn.init.kaiming_uniform_(w, nonlinearity="relu")
        elif scheme == "he_normal":
            nn.init.kaiming_normal_(w, nonlinearity="relu")
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)
