"""The run folder: everything about one run in one place (paths, create/open, model.json).

Loading a run into a model is :mod:`zerotune.load`.

    config.yaml          the fully resolved config
    checkpoints/         step-NNNNNN/ (latest few) and best/, atomic (see zerotune.train.checkpoint)
    model.safetensors    final weights
    model.json           what rebuilds the model: task, model config, data description,
                         normalisation, label names (and ``pruning`` / ``quantization`` for a
                         compressed run: int8 weights are dequantized on loading)
    adapter.safetensors  a LoRA run's adapters and new head (model.json names the base)
    tokenizer.json       for text models
    metrics.jsonl        one object per logged step
    tb/                  TensorBoard events
    eval.json, plots/, report.md
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from zerotune.errors import DistributedError, ZerotuneError
from zerotune.files import check_output, read_json_object, save_weights, write_json

ADAPTER = "adapter.safetensors"


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
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def chat_template(self) -> Path:
        return self.root / "chat_template.json"

    def model_files(self) -> list[Path]:
        """The files the run's model is rebuilt from (those it has)."""
        files = (self.config, self.model_json, self.weights, self.adapter, self.tokenizer, self.chat_template)
        return [f for f in files if f.is_file()]

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


# what a run folder holds (the verbs' own files included); anything else means it is not only a run
RUN_FILES = {"config.yaml", "checkpoints", "model.safetensors", "model.json", ADAPTER, "tokenizer.json",
             "chat_template.json", "metrics.jsonl", "tb", "eval.json", "plots", "report.md", "predictions.csv",
             "compress.json", "history.json"}


def is_run_folder(root: Path) -> bool:
    """A folder zerotune made as a run, which --overwrite may replace: it holds config.yaml and nothing but
    what runs hold (exports into it, ``export-*``, and hidden temporary files included). A config.yaml
    among other files belongs to something else."""
    names = [p.name for p in root.iterdir()]
    return "config.yaml" in names and all(n in RUN_FILES or n.startswith(("export-", ".")) for n in names)


def check_new_run(root: Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> bool:
    """Whether ``root`` may become a new run folder; True when it holds an old run to replace.

    Raises:
        ZerotuneError: ``root`` is a file, is or holds or lies inside one of ``inputs``, or is a non-empty
            folder without ``overwrite`` or that is not a run folder.
    """
    return check_output(root, overwrite=overwrite, inputs=inputs, kind="run folder", recognise=is_run_folder)


def create_run(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Run:
    """Make a new run folder. An existing run folder is replaced only with ``overwrite``; a folder that is
    not a run, or that overlaps ``inputs``, never."""
    root = Path(out)
    if check_new_run(root, overwrite, inputs):
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


def open_shared_run(root: Path, rank: int) -> Run:
    """The run folder rank 0 made, seen from process ``rank`` (it must be on a shared filesystem)."""
    if not (root / "config.yaml").is_file():
        raise DistributedError(f"rank {rank}: the run folder made by rank 0 is not visible here; every "
                               "process needs it on a shared filesystem", path=root)
    return Run(root)


def write_model_json(run: Run, meta: dict[str, Any]) -> None:
    """model.json: what rebuilds the model. Written after the weights, so it means they are complete."""
    write_json(run.model_json, meta)


def save_model(run: Run, model: nn.Module, meta: dict[str, Any]) -> None:
    """Final weights + model.json (written last, so model.json means the weights are complete)."""
    save_weights(run.weights, model.state_dict(), metadata={"format": "pt"})
    write_model_json(run, meta)


def read_model_json(run: Run) -> dict[str, Any]:
    """The run's model.json, checked for the keys every one has.

    Raises:
        ZerotuneError: the run has not finished (no model.json), or the file is unreadable (named).
    """
    if not run.model_json.is_file():
        raise ZerotuneError("run has no final model yet (model.json missing); train it to the end or resume it",
                            path=run.root)
    meta = read_json_object(run.model_json)
    for key in ("task", "model", "data_info"):
        if key not in meta:
            raise ZerotuneError(f"key {key!r} is missing", path=run.model_json)
    return meta
