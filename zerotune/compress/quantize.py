"""Weight-only int8 quantization: symmetric, one scale per output channel.

For a weight W (out × in, or out × in × kh × kw for a convolution), each output row i keeps a
scale and its entries as 8-bit integers:

    s_i = max_j |w_ij| / 127            q_ij = clamp(round(w_ij / s_i), −127, 127)  (int8)
    dequantized:  ŵ_ij = q_ij · s_i,    |w_ij − ŵ_ij| ≤ s_i / 2

(an all-zero row has s_i = 0 and q = 0). The Linear and Conv weights are quantized (see
:func:`zerotune.compress.layers.weight_layers`: not biases, norms, embeddings or a language model's
output head, which stay in float, as LLM.int8() and QLoRA leave them).

Storage: ``model.safetensors`` holds each quantized weight under its own name as int8, its scales
as float32 under ``NAME.scale``, and every other tensor as before; ``model.json`` lists the
quantized tensors under ``quantization``. That is 1 byte per weight plus 4 per row instead of 4
per weight, about 4× smaller for the quantized tensors. ``load_run`` (and so evaluate, predict,
generate, export, finetune --from) dequantizes them into the float model: the file is smaller,
but compute runs in float after loading, at the speed and memory of the source model.

Example:
    >>> zerotune.quantize("runs/pydoc_gpt_tiny")   # -> runs/pydoc_gpt_tiny-int8
"""

from __future__ import annotations

from typing import Any

import torch

from zerotune.errors import ZerotuneError

BITS = (8,)
QMAX = 127


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ZerotuneError(f"--bits: only 8 is supported (int8 weight-only quantization), got {bits!r}")


@torch.no_grad()
def quantize_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): int8 codes shaped like ``w`` and float32 scales (out,), one per output row."""
    rows = w.detach().float().reshape(w.shape[0], -1)  # (out, in·k)
    s = rows.abs().amax(dim=1) / QMAX  # (out,)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: q = 0 whatever the divisor
    q = torch.round(rows / safe[:, None]).clamp(-QMAX, QMAX).to(torch.int8)  # (out, in·k)
    return q.reshape(w.shape), s


def dequantize_tensor(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """ŵ = q · s in float32, each row by its own scale."""
    return (q.float().reshape(q.shape[0], -1) * s.float()[:, None]).reshape(q.shape)


def dequantize_state_dict(tensors: dict[str, torch.Tensor], quantization: dict[str, Any],
                          path: object) -> dict[str, torch.Tensor]:
    """The float state dict of a quantized run's model.safetensors (``quantization``: from model.json).

    Raises:
        ZerotuneError: a listed tensor or its scale is missing or malformed (named, with ``path``).
    """
    names = quantization.get("tensors") if isinstance(quantization, dict) else None
    if not isinstance(names, list):
        raise ZerotuneError("model.json: quantization.tensors must list the int8 tensors", path=path)
    out = dict(tensors)
    for name in names:
        q, s = out.get(name), out.pop(f"{name}.scale", None)
        if q is None or s is None:
            raise ZerotuneError(f"quantized tensor {name!r} or its scale {name + '.scale'!r} is missing", path=path)
        if q.dtype != torch.int8 or s.shape != (q.shape[0],):
            raise ZerotuneError(f"tensor {name!r} is not int8 with one scale per row "
                                f"({q.dtype}, scale shape {tuple(s.shape)})", path=path)
        out[name] = dequantize_tensor(q, s)
    return out


__all__ = ["quantize_tensor", "dequantize_tensor", "dequantize_state_dict", "check_bits", "BITS"]
