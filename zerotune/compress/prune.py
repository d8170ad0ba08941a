"""Magnitude pruning: zero the weights of smallest magnitude (Han et al., 2015,
https://arxiv.org/abs/1506.02626), in one shot, without retraining.

For an amount a ∈ [0, 1):

    layer    each weight tensor W with n entries: zero the k = round(a · n) entries of smallest |w|
    global   all pruned tensors together, N entries: zero the k = round(a · N) entries of smallest |w|,
             that is every |w| below one threshold t (the k-th smallest |w|) over the whole model;
             a tensor's own sparsity follows from its magnitudes

Ties at the threshold are broken by position, so exactly k entries are zeroed. What is pruned:
the weight of every Linear and Conv layer (see :func:`zerotune.compress.layers.weight_layers`); not
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

import torch

from zerotune.errors import ZerotuneError

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


__all__ = ["prune_tensors", "sparsity", "check_amount", "SCOPES"]
