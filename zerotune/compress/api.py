"""The prune and quantize verbs: a trained run in, a new compressed run out, metrics before and after.

The source run is only read. Its model is loaded as every verb loads it; a LoRA run is merged
first (W ← W + (α/r) B A, as ``zerotune export`` does), so the new run is a plain model
(:func:`zerotune.load.load_plain`). The compressed model goes to a new run folder (config.yaml and
tokenizer.json copied, model.safetensors, model.json recording the compression), which every verb
opens. Both models are measured on the run's held-out data, as ``zerotune evaluate`` measures them
(classification and regression: the test split; language models: the val split of their shards),
and the two rows are written to ``DIR/compress.json``.

    prune      magnitude pruning (zerotune.compress.prune): zeros written into the weights
    quantize   int8 weight-only quantization (zerotune.compress.quantize), dequantized on loading
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zerotune.compress.layers import weight_layers
from zerotune.compress.prune import SCOPES, check_amount, prune_tensors, sparsity
from zerotune.compress.quantize import check_bits, quantize_tensor
from zerotune.errors import ZerotuneError
from zerotune.evaluate.api import evaluate, measure
from zerotune.files import copy_file, save_weights, staged_folder, write_json
from zerotune.load import LoadedRun, load_plain, model_inputs
from zerotune.run import Run, check_new_run, open_run, write_model_json


def output_folder(source: Path, out: str | Path | None, suffix: str, overwrite: bool) -> Path:
    """The new run folder (default: the source's name + ``suffix``, beside it), checked before any work.

    Raises:
        ZerotuneError: the folder is the source, lies inside it or holds it (or the base of a LoRA
            source), or is an existing run without ``overwrite``, or a folder that is not a run.
    """
    source = Path(source)
    root = Path(out) if out else source.with_name(source.name + suffix)
    if root.resolve().is_relative_to(source.resolve()):
        raise ZerotuneError("--out: the source run is never modified; choose a folder outside it", path=root)
    check_new_run(root, overwrite, inputs=[source, *model_inputs(Run(source))])
    return root


def write_run(loaded: LoadedRun, folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Run:
    """A new run folder (empty): the source's config.yaml and tokenizer.json, ``tensors`` and model.json (last)."""
    run = Run(folder)
    copy_file(loaded.run.config, run.config)
    if loaded.run.tokenizer.is_file():
        copy_file(loaded.run.tokenizer, run.tokenizer)
    save_weights(run.weights, tensors, metadata={"format": "pt"})
    write_model_json(run, meta)
    return run


def scalar_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers and names of an evaluation (per-class lists and the confusion matrix left out)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str))}


def compare(source: Path, before: dict[str, Any], run: Run, data: str | None, details: dict[str, Any],
            label: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate the new run (writing its eval.json), write compress.json, log the two-row table."""
    after = scalar_metrics(evaluate(run.root, data=data))
    report = {"source": str(source), **details, "before": before, "after": after}
    write_json(run.root / "compress.json", report)
    log(table({"source": before, label: after}))
    return report


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Rows of metrics side by side: one column per float metric, e.g. loss, accuracy, perplexity."""
    first = next(iter(rows.values()))
    columns = [k for k, v in first.items() if isinstance(v, float)]
    width = max(len(name) for name in rows)
    sizes = [max(10, len(c)) for c in columns]
    lines = [" " * width + "".join(f"  {c:>{n}}" for c, n in zip(columns, sizes, strict=True))]
    for name, metrics in rows.items():
        cells = (f"  {metrics.get(c, float('nan')):>{n}.4f}" for c, n in zip(columns, sizes, strict=True))
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines) + f"\non {first.get('split')} (n = {first.get('n')})"


def prune(run: str | Path, amount: float = 0.5, scope: str = "layer", out: str | Path | None = None,
          overwrite: bool = False, include_embeddings: bool = False, data: str | None = None,
          log: Callable[[str], None] = print) -> Path:
    """Magnitude-prune a run's Linear/Conv weights into a new run; compare its metrics with the source's.

    Args:
        run: the source run folder (only read).
        amount: the fraction of weights to zero, in [0, 1).
        scope: ``layer`` (that fraction of each tensor) or ``global`` (one threshold over all of them).
        out: the new run folder (default ``RUN-pruned`` beside RUN); an existing non-empty one needs ``overwrite``.
        include_embeddings: also prune the embeddings and a language model's output head.
        data: evaluate both models on this data spec instead of the run's held-out split.
        log: where the before/after table goes.

    Returns:
        The new run folder. Its model.json has ``pruning`` (amount, scope, sparsity per tensor and
        overall); its compress.json the metrics before and after.

    Raises:
        ZerotuneError: a bad amount or scope, a folder that is not a run, an existing ``out``.

    Example:
        >>> zerotune.prune("runs/digits_mlp", amount=0.5)
    """
    check_amount(amount)
    if scope not in SCOPES:
        raise ZerotuneError(f"--scope: expected layer or global, got {scope!r}")
    root = output_folder(open_run(run).root, out, "-pruned", overwrite)
    loaded, meta = load_plain(run)
    before = scalar_metrics(measure(loaded, data))
    model = loaded.model
    layers = weight_layers(model, include_embeddings)
    if not layers:
        raise ZerotuneError("the model has no Linear or Conv weights to prune", path=loaded.run.root)
    threshold = prune_tensors([m.weight.data for m in layers.values()], amount, scope)
    per_tensor = {f"{name}.weight": sparsity(m.weight) for name, m in layers.items()}
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    meta["pruning"] = {"method": "magnitude", "amount": amount, "scope": scope,
                       "include_embeddings": include_embeddings, "sparsity": zeros / total,
                       "zeros": zeros, "weights": total, "threshold": threshold, "tensors": per_tensor}
    log(f"pruned {len(layers)} weight tensors: {zeros:,} of {total:,} weights are zero ({zeros / total:.1%}), "
        f"scope {scope}")
    with staged_folder(root) as folder:  # a failure leaves an earlier --out as it was
        new = write_run(loaded, folder, model.state_dict(), meta)
        compare(loaded.run.root, before, new, data, {"method": "prune", "pruning": meta["pruning"]}, "pruned", log)
    log(f"written: {root} (metrics in compress.json)")
    return root


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
    source_file = loaded.run.weights if loaded.run.weights.is_file() else None  # a LoRA run has adapters only
    with staged_folder(root) as folder:  # a failure leaves an earlier --out as it was
        new = write_run(loaded, folder, state, meta)
        sizes = {"source_file": source_file.stat().st_size if source_file else None, "float_tensors": float_bytes,
                 "quantized_file": new.weights.stat().st_size,
                 "quantized_tensors": {"float": quantized_before, "int8_with_scales": quantized_after}}
        log(f"quantized {len(names)} weight tensors to int8: {_mb(quantized_before)} -> {_mb(quantized_after)} "
            f"({quantized_before / quantized_after:.2f}x smaller)")
        what = f"model.safetensors {_mb(sizes['source_file'])}" if source_file else f"float weights {_mb(float_bytes)}"
        log(f"{what} -> model.safetensors {_mb(sizes['quantized_file'])}")
        compare(loaded.run.root, before, new, data, {"method": "quantize", "bits": bits, "sizes": sizes,
                                                     "quantization": meta["quantization"]}, "int8", log)
    log(f"written: {root} (metrics and sizes in compress.json); compute runs in float after loading")
    return root


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"
