"""Magnitude pruning: zero the weights of smallest magnitude (Han et al., 2015,
https://arxiv.org/abs/1506.02626), in one shot, without retraining.

For an amount a ∈ [0, 1):

    layer    each weight tensor W with n entries: zero the k = round(a · n) entries of smallest |w|
    global   all pruned tensors together, N entries: zero the k = round(a · N) entries of smallest |w|,
             that is every |w| below one threshold t (the k-th smallest |w|) over the whole model;
             a tensor's own sparsity follows from its magnitudes

Ties at the threshold are broken by position, so exactly k entries are zeroed. What is pruned:
the weight of every Linear and Conv layer (see :func:`zerotune.compress.base.weight_layers`); not
biases, norms, embeddings or a language model's output head, as LLM pruning usually does (the
embedding rows and the head carry every token); ``include_embeddings`` adds them.

The zeros are written into the weights themselves (no masks, no reparametrisation): the pruned
run has the same tensor names, shapes and dtypes as the source, so every verb opens it. Stored
dense, it has the same file size and runs at the same speed; what changes is how many weights
are exactly zero (and how well the file compresses with a general-purpose compressor).

Example:
    >>> zerotune.prune("runs/digits_mlp", amount=0.5, scope="global")   # -> runs/digits_mlp-pruned
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from pathlib import Path

import torch

from zerotune.compress.base import compare, output_folder, scalar_metrics, weight_layers, write_run
from zerotune.errors import ZerotuneError
from zerotune.interop.export import load_plain

SCOPES = ("layer", "global")


def check_amount(amount: float) -> None:
    if not isinstance(amount, numbers.Real) or not 0 <= amount < 1:  # NaN fails the comparison too
        raise ZerotuneError(f"--amount: expected a fraction in [0, 1), got {amount!r}")


@torch.no_grad()
def prune_tensors(weights: list[torch.Tensor], amount: float, scope: str = "layer") -> float | None:
    """Zero the smallest-magnitude entries of ``weights`` in place (see the module docstring).

    Returns:
        The global threshold t (the largest |w| zeroed), or None for ``layer`` scope or when nothing is zeroed.
    """
    check_amount(amount)
    if scope not in SCOPES:
        raise ZerotuneError(f"--scope: expected layer or global, got {scope!r}")
    if scope == "layer":
        for w in weights:
            flat = w.view(-1)
            k = round(amount * flat.numel())
            flat[torch.argsort(flat.abs(), stable=True)[:k]] = 0
        return None
    magnitudes = torch.cat([w.detach().abs().flatten().float() for w in weights])  # (N,)
    k = round(amount * magnitudes.numel())
    if k == 0:
        return None
    order = torch.argsort(magnitudes, stable=True)[:k]
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    keep[order] = False
    threshold = float(magnitudes[order[-1]])
    start = 0
    for w in weights:
        n = w.numel()
        w.view(-1).mul_(keep[start : start + n].to(w.dtype))
        start += n
    return threshold


def sparsity(w: torch.Tensor) -> float:
    """The fraction of entries that are exactly zero."""
    return float((w == 0).sum()) / w.numel()


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
    from zerotune.evaluate import measure
    from zerotune.run import open_run

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
    new = write_run(loaded, root, model.state_dict(), meta, overwrite)
    log(f"pruned {len(layers)} weight tensors: {zeros:,} of {total:,} weights are zero ({zeros / total:.1%}), "
        f"scope {scope}")
    compare(loaded.run.root, before, new, data, {"method": "prune", "pruning": meta["pruning"]}, "pruned", log)
    log(f"written: {new.root} (metrics in compress.json)")
    return new.root


__all__ = ["prune", "prune_tensors", "sparsity", "check_amount", "SCOPES"]
