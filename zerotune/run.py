"""The run folder: everything about one run in one place.

    config.yaml          the fully resolved config
    checkpoints/         step-NNNNNN/ (latest few) and best/, atomic (see zerotune.train.checkpoint)
    model.safetensors    final weights
    model.json           what rebuilds the model: task, model config, data description,
                         normalisation, label names (and ``pruning`` / ``quantization`` for a
                         compressed run: int8 weights are dequantized on loading)
    tokenizer.json       for text models
    metrics.jsonl        one object per logged step
    tb/                  TensorBoard events
    eval.json, plots/, report.md
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.train.checkpoint import atomic_write_text, load_state_dict_checked, load_weights, save_weights


@dataclass(frozen=True)
class Run:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def model_json(self) -> Path:
        return self.root / "model.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def check_new_run(root: Path, overwrite: bool = False) -> bool:
    """Whether ``root`` may become a new run folder; True when it holds an old one to replace.

    Raises:
        ZerotuneError: ``root`` is a file, or a non-empty folder without ``overwrite``.
    """
    if root.exists() and not root.is_dir():
        raise ZerotuneError("exists and is not a folder", path=root)
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise ZerotuneError("run folder already exists; pass --overwrite to replace it or --out to choose another",
                                path=root)
        return True
    return False


def create_run(out: str | Path, overwrite: bool = False) -> Run:
    """Make a new run folder. An existing non-empty folder is replaced only with ``overwrite``."""
    root = Path(out)
    if check_new_run(root, overwrite):
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    return Run(root)


def open_run(path: str | Path) -> Run:
    """An existing run folder (it must hold config.yaml)."""
    run = Run(Path(path))
    if not run.root.is_dir():
        raise ZerotuneError("run folder not found", path=run.root)
    if not run.config.is_file():
        raise ZerotuneError("not a run folder (config.yaml is missing)", path=run.root)
    return run


def open_shared_run(root: Path) -> Run:
    """The run folder rank 0 made, seen from another process (it must be on a shared filesystem)."""
    from zerotune.train.distributed import DistributedError, env_rank

    if not (root / "config.yaml").is_file():
        raise DistributedError(f"rank {env_rank()}: the run folder made by rank 0 is not visible here; every "
                               "process needs it on a shared filesystem", path=root)
    return Run(root)


def save_model(run: Run, model: nn.Module, meta: dict[str, Any]) -> None:
    """Final weights + model.json (written last, so model.json means the weights are complete)."""
    save_weights(run.weights, model.state_dict(), metadata={"format": "pt"})
    atomic_write_text(run.model_json, json.dumps(meta, indent=1))


def read_model_json(run: Run) -> dict[str, Any]:
    if not run.model_json.is_file():
        raise ZerotuneError("run has no final model yet (model.json missing); train it to the end or resume it",
                            path=run.root)
    try:
        meta = json.loads(run.model_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZerotuneError(f"unreadable JSON ({e})", path=run.model_json) from None
    for key in ("task", "model", "data_info"):
        if key not in meta:
            raise ZerotuneError(f"key {key!r} is missing", path=run.model_json)
    return meta


def read_weights(run: Run, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """model.safetensors as float tensors: a quantized run's int8 weights dequantized (w = q · scale)."""
    tensors = load_weights(run.weights)
    if "quantization" in meta:
        from zerotune.compress.quantize import dequantize_state_dict

        tensors = dequantize_state_dict(tensors, meta["quantization"], run.weights)
    return tensors


@dataclass
class LoadedRun:
    run: Run
    model: nn.Module
    meta: dict[str, Any]
    info: Any
    preprocess: Any
    tokenizer: Any = None


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's final model (eval mode) with its data description and normalisation."""
    from pydantic import TypeAdapter, ValidationError

    from zerotune.config import describe_error
    from zerotune.data import Preprocess
    from zerotune.data.base import DataInfo
    from zerotune.models import ModelConfig, build_model

    run = open_run(path)
    meta = read_model_json(run)
    parsed: dict[str, Any] = {"preprocess": Preprocess()}
    for key, kind in (("model", ModelConfig), ("data_info", DataInfo), ("preprocess", Preprocess)):
        value = meta.get(key)
        if key == "preprocess" and value is None:
            continue
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(kind)})
            if unknown:
                raise ZerotuneError(f"{key}.{unknown[0]}: unknown key", path=run.model_json)
        try:
            parsed[key] = TypeAdapter(kind).validate_python(value)
        except ValidationError as e:
            err = e.errors()[0]
            raise ZerotuneError(describe_error({**err, "loc": (key, *err["loc"])}), path=run.model_json) from None
    cfg, info = parsed["model"], parsed["data_info"]
    try:
        from zerotune.finetune.api import is_finetuned, rebuild_model

        if is_finetuned(meta):  # LoRA (base + adapter.safetensors) or a GPT sequence classifier
            model = rebuild_model(run, meta, info)
        else:
            model = build_model(cfg, info)
            load_state_dict_checked(model, read_weights(run, meta), run.weights)
    except ZerotuneError as e:
        if e.path is not None:
            raise
        raise ZerotuneError(str(e), path=run.model_json) from None
    tokenizer = None
    if run.tokenizer.is_file():
        from zerotune.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(run.tokenizer)
    return LoadedRun(run, model.to(device).eval(), meta, info, parsed["preprocess"], tokenizer)
