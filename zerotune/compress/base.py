"""What pruning and quantization share: the model to compress, the layers whose weights are
compressed, the new run folder, and the before/after metrics.

The source run is only read. Its model is loaded as every verb loads it (``load_run``); a LoRA
run is merged first (W ← W + (α/r) B A, as ``zerotune export`` does), so the new run is a plain
model. The compressed model goes to a new run folder (config.yaml and tokenizer.json copied,
model.safetensors, model.json recording the compression), which every verb opens. Both models are
measured on the run's held-out data, as ``zerotune evaluate`` measures them (classification and
regression: the test split; language models: the val split of their shards), and the two rows are
written to ``DIR/compress.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.run import LoadedRun, Run, check_new_run, create_run
from zerotune.train.checkpoint import atomic_write_text, save_weights

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_layers(model: nn.Module, include_embeddings: bool = False) -> dict[str, nn.Module]:
    """The layers whose ``weight`` is compressed, by module name, each weight tensor once.

    Every Linear and Conv layer, except a language model's output head (a Linear named ``lm_head``,
    or one whose weight is tied to an embedding). With ``include_embeddings``, also the embeddings
    and that head. Biases and norms are never included.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            wanted = include_embeddings
        elif isinstance(m, WEIGHT_LAYERS):
            is_head = name.rpartition(".")[2] == "lm_head" or id(m.weight) in embedding_weights
            wanted = include_embeddings or not is_head
        else:
            wanted = False
        if wanted and id(m.weight) not in seen:
            seen.add(id(m.weight))
            chosen[name] = m
    return chosen


def output_folder(source: Path, out: str | Path | None, suffix: str, overwrite: bool) -> Path:
    """The new run folder (default: the source's name + ``suffix``, beside it), checked before any work.

    Raises:
        ZerotuneError: the folder is the source or inside it, or exists (non-empty) without ``overwrite``.
    """
    source = Path(source)
    root = Path(out) if out else source.with_name(source.name + suffix)
    if root.resolve().is_relative_to(source.resolve()):
        raise ZerotuneError("--out: the source run is never modified; choose a folder outside it", path=root)
    check_new_run(root, overwrite)
    return root


def write_run(loaded: LoadedRun, root: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
              overwrite: bool) -> Run:
    """A new run folder: the source's config.yaml and tokenizer.json, ``tensors`` and model.json (last)."""
    run = create_run(root, overwrite)
    shutil.copyfile(loaded.run.config, run.config)
    if loaded.run.tokenizer.is_file():
        shutil.copyfile(loaded.run.tokenizer, run.tokenizer)
    save_weights(run.weights, tensors, metadata={"format": "pt"})
    atomic_write_text(run.model_json, json.dumps(meta, indent=1))
    return run


def scalar_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers and names of an evaluation (per-class lists and the confusion matrix left out)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str))}


def compare(source: Path, before: dict[str, Any], run: Run, data: str | None, details: dict[str, Any],
            label: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate the new run (writing its eval.json), write compress.json, log the two-row table."""
    from zerotune.evaluate import evaluate

    after = scalar_metrics(evaluate(run.root, data=data))
    report = {"source": str(source), **details, "before": before, "after": after}
    atomic_write_text(run.root / "compress.json", json.dumps(report, indent=1))
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


__all__ = ["weight_layers", "output_folder", "write_run", "scalar_metrics", "compare", "table"]
