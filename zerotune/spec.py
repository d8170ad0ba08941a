"""What a model is built from: the description of its data (:class:`DataInfo`).

Both the data code (which finds it out) and the model builders (which size their input and
output layers from it) import this module; neither imports the other. It is saved in every
run's ``model.json`` as ``data_info``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
