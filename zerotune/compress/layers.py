"""The layers whose weights compression touches (pruning and quantization alike)."""

from __future__ import annotations

from torch import nn

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
