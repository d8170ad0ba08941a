"""Choose which parameters train: freeze by name, keep only the last blocks, or train the head only.

Freezing sets ``requires_grad = False``; the optimizer is then built from the parameters that
still require gradients, and frozen weights never change. ``freeze`` and ``freeze_all_but_last``
only ever freeze (call :func:`unfreeze` first to start over); ``train_head_only`` sets the whole
trainable set. Each returns the number of trainable parameters left.

Blocks are found structurally: the largest ``nn.ModuleList`` in the model (the Transformer
layers of a BERT or GPT, the cells of a stacked RNN). The head is ``model.head`` when the model
has one (sequence/token classifiers), otherwise its last ``nn.Linear`` (an MLP or CNN).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.models.heads import last_linear


def trainable_count(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unfreeze(model: nn.Module) -> int:
    """Make every parameter trainable. Returns the trainable count."""
    model.requires_grad_(True)
    return trainable_count(model)


def freeze(model: nn.Module, patterns: list[str]) -> int:
    """Freeze every parameter whose name matches one of the globs, e.g. ``["embeddings.*", "layers.0.*"]``.

    Raises:
        ZerotuneError: a pattern that matches no parameter (names a few that exist).
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ZerotuneError(
                f"freeze: pattern {pattern!r} matches no parameter; parameters are e.g. {names[:6]}"
            )
    for name, p in model.named_parameters():
        if any(fnmatchcase(name, pattern) for pattern in patterns):
            p.requires_grad_(False)
    return trainable_count(model)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The largest ``nn.ModuleList`` in ``model`` and its name: the stack of layers."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ZerotuneError(
            f"{type(model).__name__} has no list of layers (nn.ModuleList) to keep the last of"
        )
    return max(lists, key=lambda item: len(item[1]))  # the first of the largest on ties


def freeze_all_but_last(model: nn.Module, k: int) -> int:
    """Freeze the blocks except the last ``k``, and everything before the blocks (embeddings).

    Parameters after the blocks (final norm, head) are left as they are.
    """
    if k < 0:
        raise ZerotuneError(f"freeze_all_but_last: k must be ≥ 0, got {k}")
    prefix, blocks = find_blocks(model)
    prefix = f"{prefix}." if prefix else ""
    kept = {f"{prefix}{i}." for i in range(max(len(blocks) - k, 0), len(blocks))}
    seen_blocks = False
    for name, p in model.named_parameters():
        in_blocks = name.startswith(prefix) and name[len(prefix) :].split(".", 1)[0].isdigit()
        seen_blocks = seen_blocks or in_blocks
        if in_blocks:
            if not any(name.startswith(s) for s in kept):
                p.requires_grad_(False)
        elif not seen_blocks:  # registered before the blocks: embeddings, input projections
            p.requires_grad_(False)
    return trainable_count(model)


def head_of(model: nn.Module) -> tuple[str, nn.Module]:
    """The output head: ``model.head`` if present, else the last ``nn.Linear``."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return "head", head
    return last_linear(model)


def train_head_only(model: nn.Module) -> int:
    """Train the head alone (see :func:`head_of`); every other parameter is frozen."""
    _, head = head_of(model)
    model.requires_grad_(False)
    head.requires_grad_(True)
    return trainable_count(model)
