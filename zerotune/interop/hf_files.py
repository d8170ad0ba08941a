"""The files of a Hugging Face model folder: ``config.json`` and the weights.

Weights are read from, in this order of preference:

    model.safetensors                           one file
    model.safetensors.index.json + shards       sharded safetensors (``weight_map``: tensor → file)
    pytorch_model.bin.index.json + shards       sharded PyTorch files
    pytorch_model.bin                           one PyTorch file, read with ``weights_only=True``

Every problem is one line naming the file: a missing or malformed index, a shard it lists that
is not there, a file that is not readable safetensors or safe PyTorch data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zerotune.errors import ZerotuneError
from zerotune.files import load_torch, load_weights, read_json_object

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model folder as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ZerotuneError("config.json not found (expected a Hugging Face model folder)", path=Path(folder))
    return read_json_object(path)


def weight_files(folder: Path) -> list[Path]:
    """The files holding a folder's weights (see the module docstring)."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    for name in INDEXES:
        index = folder / name
        if not index.is_file():
            continue
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and Path(f).name == f
                                                       for f in weight_map.values()):
            raise ZerotuneError("weight_map: expected an object of tensor names → file names in this folder",
                                path=index)
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ZerotuneError(f"shard listed in {index.name} is missing", path=f)
        return files
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise ZerotuneError("no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin",
                        path=folder)


def read_weights(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of a model folder, and the file each came from."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in weight_files(Path(folder)):
        if f.suffix == ".safetensors":
            part = load_weights(f)
        else:
            part = load_torch(f)
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise ZerotuneError("expected a state dict of tensors", path=f)
        tensors |= part
        origin |= dict.fromkeys(part, f)
    return tensors, origin
