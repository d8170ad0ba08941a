"""Weight-only int8 quantization: symmetric, one scale per output channel.

For a weight W (out × in, or out × in × kh × kw for a convolution), each output row i keeps a
scale and its entries as 8-bit integers:

    s_i = max_j |w_ij| / 127            q_ij = clamp(round(w_ij / s_i), −127, 127)  (int8)
    dequantized:  ŵ_ij = q_ij · s_i,    |w_ij − ŵ_ij| ≤ s_i / 2

(an all-zero row has s_i = 0 and q = 0). The Linear and Conv weights are quantized (see
:func:`zerotune.compress.base.weight_layers`: not biases, norms, embeddings or a language model's
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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zerotune.compress.base import compare, output_folder, scalar_metrics, weight_layers, write_run
from zerotune.errors import ZerotuneError
from zerotune.interop.export import load_plain

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


def quantize(run: str | Path, bits: int = 8, out: str | Path | None = None, overwrite: bool = False,
             data: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Quantize a run's Linear/Conv weights to int8 into a new run; compare sizes and metrics with the source.

    Args:
        run: the source run folder (only read); a LoRA run is merged first.
        bits: 8 (the only width supported).
        out: the new run folder (default ``RUN-int8`` beside RUN); an existing non-empty one needs ``overwrite``.
        data: evaluate both models on this data spec instead of the run's held-out split.
        log: where the sizes and the before/after table go.

    Returns:
        The new run folder. Its model.json has ``quantization``; its compress.json the file sizes and
        the metrics before and after.

    Raises:
        ZerotuneError: bits other than 8, a folder that is not a run, an existing ``out``.

    Example:
        >>> zerotune.quantize("runs/digits_mlp")
    """
    check_bits(bits)
    from zerotune.evaluate import measure
    from zerotune.run import open_run

    root = output_folder(open_run(run).root, out, "-int8", overwrite)
    loaded, meta = load_plain(run)
    before = scalar_metrics(measure(loaded, data))
    layers = weight_layers(loaded.model)
    if not layers:
        raise ZerotuneError("the model has no Linear or Conv weights to quantize", path=loaded.run.root)
    state = loaded.model.state_dict()
    unique = {t.data_ptr(): t for t in state.values()}  # a tied head and its embedding are one tensor
    float_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    names, quantized_before, quantized_after = [], 0, 0
    for name, m in layers.items():
        key = f"{name}.weight"
        q, s = quantize_tensor(m.weight)
        quantized_before += m.weight.numel() * m.weight.element_size()
        quantized_after += q.numel() + s.numel() * s.element_size()
        state[key], state[f"{key}.scale"] = q, s
        names.append(key)
    meta["quantization"] = {"method": "int8 weight-only, symmetric, per output channel", "bits": bits,
                            "formula": "w = q * scale[row], scale = max|w_row| / 127", "tensors": names}
    new = write_run(loaded, root, state, meta, overwrite)
    source_file = loaded.run.weights if loaded.run.weights.is_file() else None  # a LoRA run has adapters only
    sizes = {"source_file": source_file.stat().st_size if source_file else None, "float_tensors": float_bytes,
             "quantized_file": new.weights.stat().st_size,
             "quantized_tensors": {"float": quantized_before, "int8_with_scales": quantized_after}}
    log(f"quantized {len(names)} weight tensors to int8: {_mb(quantized_before)} -> {_mb(quantized_after)} "
        f"({quantized_before / quantized_after:.2f}x smaller)")
    what = f"model.safetensors {_mb(sizes['source_file'])}" if source_file else f"float weights {_mb(float_bytes)}"
    log(f"{what} -> model.safetensors {_mb(sizes['quantized_file'])}")
    compare(loaded.run.root, before, new, data, {"method": "quantize", "bits": bits, "sizes": sizes,
                                                 "quantization": meta["quantization"]}, "int8", log)
    log(f"written: {new.root} (metrics and sizes in compress.json); compute runs in float after loading")
    return new.root


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


__all__ = ["quantize", "quantize_tensor", "dequantize_tensor", "dequantize_state_dict", "check_bits", "BITS"]
