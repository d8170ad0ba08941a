"""What a model is built from: the description of its data (:class:`DataInfo`).

Both the data code (which finds it out) and the model builders (which size their input and
output layers from it) import this module; neither imports the other. It is saved in every
run's ``model.json`` as ``data_info``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

KINDS = ("image", "tabular", "sequence", "tokens")
MAX_SIZE = 2**31  # of one example, or of a vocabulary


@dataclass
class DataInfo:
    """What a model builder needs to know about the data, saved in ``model.json``.

    kind: ``image`` (x is float (N, C, H, W)), ``tabular`` (float (N, F)),
        ``sequence`` (float (N, T, F)) or ``tokens`` (long (N, T) token ids).
    target: ``classification`` (y long class ids), ``regression`` (y float), or the language-model
        objectives ``causal_lm`` and ``masked_lm``.
    """

    kind: str
    input_shape: list[int]
    target: str = "classification"
    classes: list[str] = field(default_factory=list)
    vocab_size: int | None = None
    pad_id: int | None = None

    def check(self) -> None:
        """Refuse impossible values, as read from a file (a model.json edited by hand, a corrupt one).

        Raises:
            ValueError: naming the field.
        """
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        shape = list(self.input_shape)
        sizes_ok = all(isinstance(s, int) and 1 <= s <= MAX_SIZE for s in shape)
        if not shape or not sizes_ok or math.prod(shape) > MAX_SIZE:
            raise ValueError(f"input_shape: expected sizes from 1 up to {MAX_SIZE:,} in all, got {shape}")
        if self.vocab_size is not None and not 1 <= self.vocab_size <= MAX_SIZE:
            raise ValueError(f"vocab_size: expected 1 to {MAX_SIZE:,}, got {self.vocab_size}")
        if self.pad_id is not None and not 0 <= self.pad_id < (self.vocab_size or MAX_SIZE):
            raise ValueError(f"pad_id: expected an id in the vocabulary, got {self.pad_id}")

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.target == "classification" else 1

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "target": self.target,
            "classes": list(self.classes),
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
        }
