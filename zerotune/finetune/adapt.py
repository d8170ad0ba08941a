"""Adapting a pretrained model to a task: the head the task needs, and which parameters train.

The model trained is the source with the head the config's task asks for:

    task                        bert body                        gpt body                     classic net
    classification/regression   SequenceClassifier (mean|cls)    SequenceClassifier (last)    new output layer
    causal_lm (shards:DIR)      --                               the GPT itself               --
    sft                         --                               the GPT itself               --

(A GPT body is the decoder whose output layer is the identity, so it returns the final-norm hidden
states (B, T, d).)

Methods (``--method``, else ``finetune.method``, else ``full``):

    full     every parameter trains
    freeze   ``finetune.head_only``, ``finetune.train_last: k`` (last k blocks + what follows them) and/or
             ``finetune.freeze`` name globs; with none of these the head alone trains
    lora     low-rank adapters on ``finetune.lora.targets`` (default: query/value for bert, the fused
             q/k/v projection ``attn.qkv`` for gpt) plus a new head; everything else frozen
    qlora    lora on a quantized base (``zerotune.finetune.qlora.quantize_for_qlora``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from torch import nn

from zerotune.config import FinetuneConfig
from zerotune.errors import ZerotuneError
from zerotune.finetune import freeze as F
from zerotune.finetune import lora as L
from zerotune.models.gpt import GPT
from zerotune.models.heads import SequenceClassifier, replace_head
from zerotune.models.init import init_weights
from zerotune.spec import DataInfo

METHODS = ("full", "freeze", "lora", "qlora")
LORA_METHODS = ("lora", "qlora")
DEFAULT_TARGETS = {"bert": ["query", "value"], "gpt": ["attn.qkv"]}
CLASSIC = ("mlp", "cnn", "resnet", "rnn")
HEAD_INIT = "normal(0.02)"


@dataclass
class Pretrained:
    """What a SOURCE loads to: the body and everything needed to put a task head on it."""

    family: str  # "bert", "gpt" or a classic arch ("mlp", "cnn", "resnet", "rnn")
    model: nn.Module  # BERT encoder, GPT decoder (with its LM head) or the whole classic net
    config: BaseModel  # the zerotune model config that builds ``model``
    tokenizer: Any = None  # tokenizers.Tokenizer for text models
    info: DataInfo | None = None  # a zerotune run's data description (None for Hugging Face folders)
    pooling: str | None = None  # the pooling the source itself uses (sentence-transformers, a run's head)


def gpt_body(model: GPT) -> GPT:
    """The decoder as a body: its output layer becomes the identity, so it returns hidden states (B, T, d)."""
    model.lm_head = nn.Identity()
    return model


def check_family(family: str, task: str, source: str) -> None:
    """Can a model of ``family`` be fine-tuned for ``task``? (Checked before any data is read.)"""
    allowed = {"classification": ("bert", "gpt", *CLASSIC), "regression": ("bert", "gpt", *CLASSIC),
               "causal_lm": ("gpt",), "sft": ("gpt",)}
    if task not in allowed:
        raise ZerotuneError(f"task {task!r}: finetune supports {', '.join(allowed)}")
    if family not in allowed[task]:
        raise ZerotuneError(f"task {task}: needs a {' or '.join(allowed[task])} model, but SOURCE is a {family} "
                            "model", path=source)


def task_model(pre: Pretrained, task: str, info: DataInfo, pooling: str | None = None) -> tuple[nn.Module, list[str]]:
    """Put the head for ``task`` (data described by ``info``) on the pretrained model.

    Returns:
        The model and the globs of its new parameters (the head), which LoRA also trains.

    Raises:
        ZerotuneError: the family cannot do the task, or the data does not fit the model.
    """
    if task in ("classification", "regression"):
        if pre.family in ("bert", "gpt"):
            if info.kind != "tokens":
                raise ZerotuneError(f"data.train: a {pre.family} model needs text (a text column), "
                                    f"the data is {info.kind}")
            vocab = pre.config.vocab_size
            if info.vocab_size is not None and vocab is not None and info.vocab_size > vocab:
                raise ZerotuneError(f"data.tokenizer: its vocabulary ({info.vocab_size}) is larger than the "
                                    f"model's ({vocab}); use the SOURCE's tokenizer")
        if pre.family == "bert":
            pooling = pooling or pre.pooling or pre.config.pooling
            if pooling not in ("mean", "cls"):
                raise ZerotuneError(f"finetune.pooling: a bert model pools mean or cls, got {pooling!r}")
            model = SequenceClassifier(pre.model, pre.config.hidden, info.n_outputs, pooling, info.pad_id,
                                       pre.config.dropout)  # the layout zerotune.models.bert.build makes
            init_weights(model.head, pre.config.init)
            return model, ["head.*"]
        if pre.family == "gpt":
            pooling = pooling or "last"
            model = SequenceClassifier(gpt_body(pre.model), pre.config.d_model, info.n_outputs, pooling,
                                       info.pad_id)
            init_weights(model.head, HEAD_INIT)
            return model, ["head.*"]
        return _classic_model(pre, info)
    if task == "causal_lm" or task == "sft":
        if pre.family != "gpt":
            raise ZerotuneError(f"task {task}: needs a decoder (gpt, llama, ...) SOURCE, this one is {pre.family}")
        return pre.model, []
    raise ZerotuneError(f"task {task!r}: finetune supports classification, regression, causal_lm and sft")


def _classic_model(pre: Pretrained, info: DataInfo) -> tuple[nn.Module, list[str]]:
    old = pre.info
    if old is not None and (old.kind != info.kind or list(old.input_shape) != list(info.input_shape)):
        raise ZerotuneError(f"data.train: examples are {info.kind} {info.input_shape}, but the {pre.family} "
                            f"SOURCE was trained on {old.kind} {old.input_shape}")
    if old is not None and old.target == info.target and old.classes == info.classes:
        return pre.model, []  # the same outputs: keep the trained head
    name = replace_head(pre.model, info.n_outputs)
    return pre.model, [f"{name}.*"]


def apply_method(model: nn.Module, family: str, method: str, ft: FinetuneConfig, new: list[str]) -> dict[str, Any]:
    """Choose the trainable parameters per ``method``. Returns what model.json records about it."""
    if method not in METHODS:
        raise ZerotuneError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "full":
        return {}
    if method == "freeze":
        if not (ft.head_only or ft.train_last is not None or ft.freeze):
            if not new:
                raise ZerotuneError("finetune: method freeze needs finetune.freeze, finetune.train_last or "
                                    "finetune.head_only for a model without a new head")
            F.train_head_only(model)
        if ft.head_only:
            F.train_head_only(model)
        if ft.train_last is not None:
            F.freeze_all_but_last(model, ft.train_last)
        if ft.freeze:
            F.freeze(model, ft.freeze)
        return {}
    targets = ft.lora.targets or DEFAULT_TARGETS.get(family)
    if not targets:
        raise ZerotuneError(f"finetune.lora.targets: required for a {family} model (names of its linear layers)")
    modules = L.apply_lora(model, targets, ft.lora.r, ft.lora.alpha, ft.lora.dropout)
    L.mark_only_lora_as_trainable(model, also=new)
    if method == "qlora":
        from zerotune.finetune.qlora import quantize_for_qlora  # bitsandbytes, on this path only

        # the frozen linear layers (LoRA bases included) are quantized; the new head stays full precision
        quantize_for_qlora(model, ft.qlora_bits, skip=("lm_head", *(g.removesuffix(".*") for g in new)))
    return {"lora": {"r": ft.lora.r, "alpha": ft.lora.alpha, "dropout": ft.lora.dropout, "targets": targets,
                     "modules": modules, "also": new}}


def adapted_model(pre: Pretrained, task: str, info: DataInfo, ft: FinetuneConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The model to fine-tune: SOURCE with the task's head, trainable parameters chosen per ``ft.method``.

    Returns:
        The model and what model.json records about the method (see :func:`apply_method`).
    """
    model, new = task_model(pre, task, info, ft.pooling)
    return model, apply_method(model, pre.family, ft.method, ft, new)


def check_strategy(method: str, strategy: str) -> None:
    """Can ``method`` train under the distributed ``strategy`` in use (none, ddp or fsdp)?

    Full, freeze and LoRA runs train under DDP or FSDP2 (both leave frozen parameters out of the
    gradient reduction); QLoRA trains under DDP only.

    Raises:
        ZerotuneError: QLoRA under FSDP.
    """
    if method == "qlora" and strategy == "fsdp":
        raise ZerotuneError("train.strategy: fsdp cannot shard the quantized weights of a qlora run; "
                            "use train.strategy ddp (or auto), or method lora")
