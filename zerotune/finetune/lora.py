"""Low-rank adaptation (LoRA, Hu et al., 2021, https://arxiv.org/abs/2106.09685) for any ``nn.Module``.

A frozen linear layer y = W x + b gets a trainable low-rank update of rank r:

    y = W x + b + (α / r) · B A dropout(x),     A ∈ ℝ^{r × in},  B ∈ ℝ^{out × r}

A starts Kaiming-uniform (a = √5, like ``nn.Linear``) and B at zero, so training starts from
the pretrained function exactly. Merging folds the update into the weight,
W ← W + (α / r) B A, for export and faster inference; unmerging subtracts it again.

The adapter parameters are found by type (the ``lora_A`` / ``lora_B`` of a :class:`LoRALinear`),
never by guessing from names, and :func:`lora_state_dict` saves only them (a few MB at most).

Example:
    >>> names = apply_lora(model, ["query", "value"], r=8, alpha=16)
    >>> mark_only_lora_as_trainable(model, also=["head.*"])
    >>> ...train...
    >>> zerotune.files.save_weights("adapter.safetensors", lora_state_dict(model))
    >>> merge_lora(model)
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from zerotune.errors import ZerotuneError


class LoRALinear(nn.Module):
    """An ``nn.Linear`` with a trainable low-rank update (see the module docstring).

    Args:
        base: the linear layer to adapt; kept as ``self.base`` with its own parameters.
        r: rank of the update.
        alpha: scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapter's input only.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ZerotuneError(f"lora.r: expected at least 1, got {r}")
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """(α / r) B A, the update to the weight, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        a = F.linear(self.dropout(x), self.lora_A)  # (..., r)
        return y + F.linear(a, self.lora_B) * self.scaling  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def matches(name: str, target: str) -> bool:
    """Does module ``name`` match ``target``: the same name, a dotted suffix of it, or a glob."""
    return name == target or name.endswith("." + target) or fnmatchcase(name, target)


def apply_lora(
    model: nn.Module, targets: list[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0
) -> list[str]:
    """Wrap every ``nn.Linear`` whose name matches one of ``targets`` in a :class:`LoRALinear`, in place.

    Args:
        model: any module.
        targets: module-name suffixes or globs, e.g. ``["query", "value"]`` or ``["layers.*.attn.*"]``.
        r, alpha, dropout: see :class:`LoRALinear`.

    Returns:
        The names of the adapted modules.

    Raises:
        ZerotuneError: no linear layer matched (the message lists some that exist).
    """
    if not targets:
        raise ZerotuneError("lora.targets: give at least one module name, e.g. ['query', 'value']")
    wrapped = {id(layer.base) for layer in lora_layers(model).values()}  # never adapt a layer twice
    chosen = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and id(m) not in wrapped and any(matches(name, t) for t in targets)
    ]
    if not chosen:
        linear = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ZerotuneError(
            f"lora.targets: {targets} matched no linear layer; linear layers are named e.g. {suffixes[:12]}"
        )
    for name in chosen:
        model.set_submodule(name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _adapter_names(model: nn.Module) -> set[str]:
    return {f"{name}.{p}" if name else p for name in lora_layers(model) for p in ("lora_A", "lora_B")}


def mark_only_lora_as_trainable(model: nn.Module, also: list[str] | tuple[str, ...] = ()) -> int:
    """Freeze everything except the LoRA adapters and the parameters matching the globs in ``also``.

    Returns:
        The number of trainable parameters.
    """
    adapters = _adapter_names(model)
    if not adapters:
        raise ZerotuneError("no LoRA layers in the model; call apply_lora first")
    for name, p in model.named_parameters():
        p.requires_grad_(name in adapters or any(fnmatchcase(name, g) for g in also))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W ← W + (α/r) B A). Returns the number of layers merged."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`. Returns the number of layers unmerged."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.unmerge()
    return len(layers)


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain ``nn.Linear`` back in place (for export). Returns ``model``."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        model.set_submodule(name, layer.base)
    return model


def lora_state_dict(model: nn.Module, also: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``*.lora_A``, ``*.lora_B``), plus parameters matching the globs ``also``."""
    adapters = _adapter_names(model)
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k in adapters or any(fnmatchcase(k, g) for g in also)
    }


def load_lora_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], path: object | None = None
) -> None:
    """Load adapter tensors saved by :func:`lora_state_dict` into a model with the same LoRA layers.

    Every adapter of the model must be in ``state`` with its shape; extra keys must be parameters
    of the model (e.g. a head saved with ``also``). Merged layers are unmerged, loaded and re-merged.

    Raises:
        ZerotuneError: a missing, unknown or mis-shaped tensor (named), ``path`` naming the file.
    """
    adapters = _adapter_names(model)
    if not adapters:
        raise ZerotuneError(
            "the model has no LoRA layers; call apply_lora with the same targets first", path=path
        )
    own = model.state_dict()
    for name in sorted(adapters):
        if name not in state:
            raise ZerotuneError(f"missing adapter tensor {name!r}", path=path)
    for name, t in state.items():
        if name not in own:
            raise ZerotuneError(f"unexpected tensor {name!r} (no such parameter in the model)", path=path)
        if tuple(t.shape) != tuple(own[name].shape):
            raise ZerotuneError(
                f"tensor {name!r} has shape {list(t.shape)}, the model expects {list(own[name].shape)}",
                path=path,
            )
    merged = [layer for layer in lora_layers(model).values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    model.load_state_dict(state, strict=False)
    for layer in merged:
        layer.merge()
