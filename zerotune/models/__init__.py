"""Model families, one file each. ``ARCHS`` maps ``model.arch`` to (config class, builder).

A builder takes the family's config and the data's :class:`~zerotune.spec.DataInfo`
and returns a plain ``nn.Module``.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field
from torch import nn

from zerotune.models import bert, cnn, gpt, mlp, rnn
from zerotune.spec import DataInfo

ARCHS = {
    "mlp": (mlp.MLPConfig, mlp.build),
    "cnn": (cnn.CNNConfig, cnn.build),
    "resnet": (cnn.ResNetConfig, cnn.build_resnet),
    "rnn": (rnn.RNNConfig, rnn.build),
    "gpt": (gpt.GPTConfig, gpt.build),
    "bert": (bert.BERTConfig, bert.build),
}

ModelConfig = Annotated[Union[tuple(cfg for cfg, _ in ARCHS.values())], Field(discriminator="arch")]  # noqa: UP007


def build_model(cfg, info: DataInfo) -> nn.Module:
    """Build the model that ``cfg`` (one of the family configs) describes for data ``info``."""
    _, builder = ARCHS[cfg.arch]
    return builder(cfg, info)

