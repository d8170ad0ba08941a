"""Masked-language-model corruption, the BERT rule (Devlin et al., 2019, §3.1).

Each non-special token is chosen with probability p (0.15). A chosen token becomes

    [MASK]            with probability 0.8
    a random token    with probability 0.1  (uniform over the vocabulary)
    itself            with probability 0.1

and its label is the original id; every other label is -100, the ``ignore_index`` of
``F.cross_entropy``, so the loss is taken on chosen positions only. Special tokens (padding,
[CLS], [SEP]) are never chosen. All randomness comes from the given ``torch.Generator``, so a
seed reproduces the same masks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from zerotune.errors import ZerotuneError

IGNORE_INDEX = -100


def mask_tokens(
    ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: Iterable[int],
    generator: torch.Generator | None = None,
    p: float = 0.15,
    rows: slice = slice(None),
    n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a batch of token ids for masked-language-model training.

    Args:
        ids: token ids, any shape, e.g. (B, T); not modified.
        vocab_size: random replacements are drawn from ``0 … vocab_size-1``.
        mask_id: the id of ``[MASK]``.
        special_ids: ids never chosen (padding, [CLS], [SEP], …).
        generator: source of randomness (on the same device as ``ids``); None uses the global one.
        p: probability that a non-special token is chosen.
        rows: with ``n``, ids is ``batch[rows]`` of a batch of n rows; the random numbers of all n
            rows are drawn and ids' rows get their own, so they are corrupted as within that batch.
        n: the size of that whole batch (default: ``len(ids)``, ids is the whole batch).

    Returns:
        ``(inputs, labels)``, both shaped like ``ids``; labels are -100 where nothing is predicted.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = mask_tokens(ids, vocab_size=30522, mask_id=103, special_ids=[0, 101, 102], generator=g)
    """
    if not 0.0 <= p <= 1.0:
        raise ZerotuneError(f"mask probability p must be in [0, 1], got {p}")
    if not 0 <= mask_id < vocab_size:
        raise ZerotuneError(f"mask_id {mask_id} is outside the vocabulary of size {vocab_size}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ZerotuneError(f"token ids must be an integer tensor, got {ids.dtype}")
    special = torch.tensor(sorted(set(special_ids)), dtype=ids.dtype, device=ids.device)
    candidate = ~torch.isin(ids, special)  # (B, T)
    shape = ids.shape if n is None else (n, *ids.shape[1:])  # the whole batch's
    draw = torch.rand(shape, generator=generator, device=ids.device)[rows]  # (B, T)
    chosen = candidate & (draw < p)
    how = torch.rand(shape, generator=generator, device=ids.device)[rows]  # (B, T): mask / random / keep
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=ids.device, dtype=ids.dtype)[rows]
    inputs = ids.clone()
    inputs[chosen & (how < 0.8)] = mask_id
    to_random = chosen & (how >= 0.8) & (how < 0.9)
    inputs[to_random] = random_ids[to_random]
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels
