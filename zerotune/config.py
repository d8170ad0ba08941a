"""Typed, validated configs: one pydantic model per concern, loaded from YAML.

    seed, task
    data      where examples come from and how they are split, normalised and augmented
    model     the architecture (``model.arch`` picks the family; see ``zerotune.models.ARCHS``)
    optim     optimizer and its hyper-parameters
    schedule  learning-rate schedule with warmup
    train     the loop: epochs/steps, batch, loss, evaluation, checkpoints, early stopping
    finetune  (optional) how ``zerotune finetune`` adapts a pretrained model: method, freezing, LoRA
    sft       (optional) instruction tuning: the chat template, row length, packing

A config file must be a YAML mapping; defaults fill only keys it leaves out. ``--set a.b=v``
overrides are parsed as YAML scalars and validated like the file. Every problem becomes a
:class:`~zerotune.errors.ZerotuneError` naming the file and key, e.g.
``configs/x.yaml: train.epochs: expected an integer, got 'five'``.
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zerotune.errors import ZerotuneError
from zerotune.files import read_text
from zerotune.models import ARCHS, ModelConfig
from zerotune.models.mlp import MLPConfig

TASKS = ("classification", "regression", "causal_lm", "masked_lm", "sft")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(Strict):
    """Image augmentation applied on the device, per batch (train split only)."""

    enabled: bool = False
    crop_padding: int = Field(0, ge=0)  # random crop after zero-padding by this many pixels
    hflip: bool = False  # random horizontal flip (p=0.5)
    rotate: float = Field(0.0, ge=0, le=180)  # small affine: rotation in degrees, ±
    translate: float = Field(0.0, ge=0, le=0.5)  # small affine: shift as a fraction of the size, ±
    scale: float = Field(0.0, ge=0, lt=1)  # small affine: zoom factor 1 ± scale
    noise: float = Field(0.0, ge=0)  # std of added Gaussian noise (in normalised units)


class DataConfig(Strict):
    train: str = "builtin:digits"
    val: str | None = None
    test: str | None = None
    val_split: float = Field(0.1, ge=0, lt=1)
    test_split: float = Field(0.2, ge=0, lt=1)
    text_column: str = "text"
    label_column: str | None = "label"  # null: the file holds inputs only
    normalize: bool = True
    max_length: int = Field(128, ge=1)  # tokens per text example; caps masked-LM and fine-tuned causal-LM windows
    vocab_size: int = Field(8000, ge=16)  # word vocabulary built for text data without a tokenizer
    tokenizer: str | None = None  # a tokenizer.json (or its folder) for text data
    sampling: Literal["random", "sequential"] = "random"  # language models: how windows are drawn from shards
    eval_batches: int = Field(20, ge=1)  # language models: val batches per evaluation
    classes: list[str] | None = None  # classification: keep only these labels, in this order
    in_memory: Literal["auto", True, False] = "auto"  # images:DIR, arrays:DIR: all in memory, or read per batch
    num_workers: int | None = Field(None, ge=0)  # DataLoader processes for data read from files (None: auto)
    augment: AugmentConfig = AugmentConfig()

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_as_strings(cls, v: Any) -> Any:
        # YAML reads `classes: [5, 6]` as integers; labels are compared by name
        if not isinstance(v, list):
            return v
        return [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in v]


class OptimConfig(Strict):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):  # NaN fails too
            raise ValueError("each beta must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov needs optim.momentum > 0")
        return self


class ScheduleConfig(Strict):
    name: Literal["constant", "step", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # linear warmup from 0 over this many optimizer steps
    step_size: int = Field(1000, ge=1)  # "step": multiply the lr by gamma every step_size steps
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # "cosine"/"linear": floor as a fraction of lr


class EarlyStopping(Strict):
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    patience: int = Field(5, ge=1)  # evaluations without improvement before stopping
    min_delta: float = Field(0.0, ge=0)
    restore_best: bool = True


class TrainConfig(Strict):
    epochs: int | None = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; stops at whichever comes first
    batch_size: int = Field(32, ge=1)  # examples per optimizer step (the global batch)
    grad_accum: int = Field(1, ge=1)  # micro-batches the batch is split into (same math, less memory)
    loss: Literal["auto", "cross_entropy", "mse", "bce"] = "auto"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = Field(0.0, ge=0)  # max global grad norm; 0 = off
    metrics: list[str] = ["accuracy"]
    eval_every: int = Field(0, ge=0)  # optimizer steps between evaluations; 0 = each epoch
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0)  # steps between checkpoints; 0 = at every evaluation
    keep_last: int = Field(2, ge=1)
    early_stopping: EarlyStopping | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, else fp32
    compile: bool = False
    num_threads: int | None = Field(None, ge=1)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skips: int = Field(10, ge=0)
    progress: bool = True
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"  # several processes (torchrun): auto = ddp
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    dist_timeout: int = Field(600, ge=1)  # seconds a process waits for the others before giving up

    @model_validator(mode="after")
    def _some_stop(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set train.epochs or train.max_steps")
        return self


class LoRAConfig(Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None  # module names/globs; None: the family's default (see zerotune.finetune.api)


class FinetuneConfig(Strict):
    """How ``zerotune finetune`` adapts the model it starts from (``--from SOURCE``)."""

    source: str | None = None  # the model to adapt when --from is not given; the verb records it for --resume
    method: Literal["full", "freeze", "lora", "qlora"] = "full"
    freeze: list[str] = []  # "freeze": parameter-name globs to freeze, e.g. ["body.embeddings.*"]
    train_last: int | None = Field(None, ge=0)  # "freeze": train only the last k blocks (and the head)
    head_only: bool = False  # "freeze": train the head alone
    lora: LoRAConfig = LoRAConfig()
    qlora_bits: int = Field(4, ge=2, le=8)
    pooling: Literal["mean", "cls", "last"] | None = None  # sequence heads; None: the family's default


class ChatTemplate(Strict):
    """Role markers of the chat format (rendering and encoding: :mod:`zerotune.data.chat`)."""

    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"
    default_system: str | None = None  # a system message put first when an example has none

    def marker(self, role: str) -> str:
        return getattr(self, role)


class SFTConfig(Strict):
    """Options of instruction tuning (the ``sft:`` section of a config, ``task: sft``)."""

    template: ChatTemplate = ChatTemplate()
    max_length: int | None = Field(None, ge=2)  # positions per row; None: model.block_size
    packing: bool = False  # several whole examples per row (see zerotune.data.chat)


class Config(Strict):
    seed: int = Field(0, ge=0, lt=2**32)
    task: Literal[TASKS] = "classification"  # type: ignore[valid-type]
    data: DataConfig = DataConfig()
    model: ModelConfig = MLPConfig()  # type: ignore[valid-type]
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    sft: SFTConfig | None = None  # instruction tuning (task: sft); see zerotune.data.chat
    finetune: FinetuneConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_arch(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and "arch" not in raw["model"]:
            raw = {**raw, "model": {"arch": "mlp", **raw["model"]}}
        return raw

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- loading and errors


MAX_YAML_VALUES = 100_000  # a config is a few hundred values; more is an alias bomb or not a config
MAX_YAML_DEPTH = 50


def safe_yaml(text: str, where: object) -> Any:
    """``yaml.safe_load`` of ``text``, refused in one line (naming ``where``) when it is malformed, nested
    deeper than MAX_YAML_DEPTH or expands (aliases counted each time they are used) past MAX_YAML_VALUES."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ZerotuneError(f"{line}invalid YAML: {problem}", path=where) from None
    except RecursionError:
        raise ZerotuneError("invalid YAML: nested too deeply", path=where) from None
    stack, count = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise ZerotuneError(f"expands to more than {MAX_YAML_VALUES:,} values (YAML aliases?); a config is far "
                                "smaller", path=where)
        if depth > MAX_YAML_DEPTH:
            raise ZerotuneError(f"nested deeper than {MAX_YAML_DEPTH} levels; a config is far flatter", path=where)
        if isinstance(node, dict):
            stack += [(v, depth + 1) for kv in node.items() for v in kv]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]
    return data


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file with ``safe_load``; unreadable, unsafe, malformed or runaway files are a ZerotuneError."""
    return safe_yaml(read_text(path), Path(path))


ENV_SET = "ZEROTUNE_SET"  # extra KEY=VALUE assignments (space-separated) the training verbs apply last


def training_overrides(overrides: dict[str, Any] | list[str] | None, log=None) -> dict[str, Any]:
    """The overrides a training verb applies: ``overrides``, then those of ``$ZEROTUNE_SET``
    (e.g. ``train.max_steps=3`` to try a recipe quickly), which win; ``log`` is told when there are."""
    merged = dict(parse_overrides(overrides) if isinstance(overrides, list) else overrides or {})
    extra = os.environ.get(ENV_SET, "").split()
    if extra:
        merged |= parse_overrides(extra)
        if log is not None:
            log(f"{ENV_SET}: {' '.join(extra)} (applied after the config and --set)")
    return merged


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=3", "model.hidden=[32,32]"]`` → ``{"train.epochs": 3, ...}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ZerotuneError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.epochs=3")
        try:
            value = safe_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
        except ZerotuneError as e:
            if "invalid YAML" not in str(e):
                raise
            value = raw  # not YAML: the text itself
        out[key.strip()] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ZerotuneError(f"--set {dotted}: {p} is not a mapping")
            node = child
        node[leaf] = value
    return raw


def _loc(loc: tuple) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        if isinstance(p, int) and parts:
            parts[-1] = f"{parts[-1]}[{p}]"
        elif isinstance(p, int):  # an integer key at the top of the file
            parts.append(str(p))
        elif i > 0 and loc[i - 1] == "model" and p in ARCHS:
            continue  # the discriminator tag pydantic inserts for model.arch
        elif p in ("function-after", "function-before"):
            continue
        else:
            parts.append(str(p))
    return ".".join(parts)


_EXPECTED = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def _keys_beside(loc: tuple) -> list[str]:
    """The keys a config allows next to the one at ``loc`` (for "did you mean"), [] where unknown."""
    node: Any = Config
    for part in loc[:-1]:
        if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
            node = next((a for a in typing.get_args(node) if isinstance(a, type) and issubclass(a, BaseModel)), node)
        elif part in ARCHS:  # the tag pydantic puts in a model.arch union
            node = ARCHS[part][0]
        elif not isinstance(part, int):
            return []
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def describe_error(err: dict) -> str:
    """One pydantic error → ``key: problem``."""
    where = _loc(err["loc"])
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), _keys_beside(err["loc"]), n=1, cutoff=0.6)
        return f"{where}: unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind == "union_tag_invalid":
        return f"{where}.arch: unknown arch {value.get('arch')!r}; choose from {', '.join(ARCHS)}"
    if kind == "union_tag_not_found":
        return f"{where}.arch: required ({', '.join(ARCHS)})"
    if kind in _EXPECTED:
        return f"{where}: {_EXPECTED[kind]}, got {value!r}"
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return f"{where}: expected one of {allowed}, got {value!r}"
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    return f"{where}: {msg}, got {value!r}" if where else msg


def validate(raw: Any, source: str) -> Config:
    """Validate a mapping into a Config; the first problem becomes a one-line ZerotuneError."""
    if raw is None:
        raise ZerotuneError("config is empty; expected a YAML mapping", path=source)
    if not isinstance(raw, dict):
        raise ZerotuneError(f"expected a YAML mapping at the top level, got {type(raw).__name__}", path=source)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ZerotuneError(describe_error(e.errors()[0]), path=source) from None


def load_config(
    source: str | Path | dict | Config | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> Config:
    """Load a config from a YAML file, a mapping or a Config, then apply dotted overrides.

    Example:
        >>> cfg = load_config("configs/digits_mlp.yaml", ["train.epochs=3"])
    """
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if isinstance(source, Config):
        raw, name = source.to_dict(), "config"
    elif isinstance(source, dict):
        raw, name = dict(source), "config"
    elif source is None:
        raw, name = {}, "config"
    else:
        raw, name = read_yaml(source), str(source)
        if raw is None or not isinstance(raw, dict):
            validate(raw, name)  # raises the right one-line error
    if overrides:
        raw = apply_overrides(raw, dict(overrides))
    return validate(raw, name)
