"""``zerotune export RUN --format onnx``: a run's model as one ONNX graph that takes raw inputs.

The graph is traced with PyTorch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``,
which turns a ``torch.export`` program into ONNX through ``onnxscript``), opset 18, with a dynamic
batch axis and, for token models, a dynamic sequence axis (up to the model's block size or
maximum position). LoRA adapters are merged first, as for the other formats.

What is folded into the graph, so that onnxruntime on raw inputs gives ``zerotune predict``'s numbers:

    classic nets (mlp, cnn, resnet, rnn on images/tabular/sequences)
        input (batch, *input_shape) float32, raw   →   x' = (x − mean) / std   →   model
        classification: logits (batch, classes)
        regression:     values (batch, 1) in the data's units, y = y' · y_std + y_mean
    sequence classifiers / regressors (BERT or GPT body + pooled head)
        input_ids, attention_mask (batch, seq) int64   →   logits or values as above
    BERT masked LM       input_ids, attention_mask   →   logits (batch, seq, vocab)
    GPT decoders (causal_lm, sft)   input_ids (batch, seq) int64   →   logits (batch, seq, vocab);
                                    no KV cache: each call reads the whole sequence

Written: ``model.onnx`` (weights inside; ``model.onnx.data`` beside it past 1 GiB), ``model.json``
(task, input and output names, shapes and dtypes), ``labels.json`` (class names in output order)
where there are classes, and ``tokenizer.json`` (and ``chat_template.json``) for text models.

An RNN on token ids is not exported: it packs each row's real tokens (``pack_padded_sequence``),
which neither ONNX exporter of torch 2.13 can trace.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.files import copy_file, write_json
from zerotune.load import LoadedRun
from zerotune.models.bert import BERT, BERTMaskedLM
from zerotune.models.gpt import GPT
from zerotune.models.heads import SequenceClassifier
from zerotune.models.rnn import RNNClassifier

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf files stop at 2 GiB: larger weights go to model.onnx.data


def require_onnx() -> None:
    """Raise the one-line install hint when the exporter's packages are missing."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ZerotuneError("--format onnx needs the onnx and onnxscript packages: pip install 'zerotune[onnx]'")\
            from None


class RawFeatures(nn.Module):
    """A classic net behind the run's normalisation: raw x → (x − mean)/std → model (→ y·std + mean)."""

    def __init__(self, model: nn.Module, preprocess, regression: bool) -> None:
        super().__init__()
        self.model, self.preprocess, self.regression = model, preprocess, regression

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self.model(self.preprocess.x(input))  # (B, n_outputs)
        return self.preprocess.y_inverse(out) if self.regression else out


class RawTokens(nn.Module):
    """A token model with an explicit attention mask (1 real, 0 padding); regression values unscaled."""

    def __init__(self, model: nn.Module, preprocess, regression: bool) -> None:
        super().__init__()
        self.model, self.preprocess, self.regression = model, preprocess, regression

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids, attention_mask=attention_mask)
        return self.preprocess.y_inverse(out) if self.regression else out


class Decoder(nn.Module):
    """A GPT's full-sequence forward (no KV cache): input_ids (B, T) → logits (B, T, V)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def export_onnx(loaded: LoadedRun, model: nn.Module, folder: Path, merged_from: str | None) -> Path:
    """Write ``model`` (LoRA already merged: ``merged_from`` names the method) of ``loaded`` as an
    ONNX folder into the empty ``folder``; see the module docstring."""
    require_onnx()
    wrapper, example, inputs, outputs = _graph_for(loaded, model)
    names = [i["name"] for i in inputs]
    seq_max = _max_length(model) if loaded.info.kind == "tokens" else None
    axes = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq", max=seq_max)}
    dims = {i["name"]: {d: axes[a] for d, a in enumerate(i["shape"]) if isinstance(a, str)} for i in inputs}
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with _quiet():
            torch.onnx.export(wrapper.eval(), example, folder / "model.onnx", dynamo=True, opset_version=OPSET,
                              input_names=names, output_names=[o["name"] for o in outputs], dynamic_shapes=dims,
                              external_data=params > EXTERNAL_DATA_BYTES, verbose=False)
    except Exception as e:  # the exporter's own errors are long reports: keep their first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ZerotuneError(f"--format onnx: torch.onnx could not export this model ({type(e).__name__}: "
                            f"{first})", path=loaded.run.root) from None
    info = loaded.info
    if info.classes and info.target == "classification":
        write_json(folder / "labels.json", list(info.classes))
    for name in ("tokenizer.json", "chat_template.json"):
        if (loaded.run.root / name).is_file():
            copy_file(loaded.run.root / name, folder / name)
    meta = {"format": "onnx", "opset": OPSET, "exporter": "torch.onnx.export(dynamo=True)",
            "task": loaded.meta["task"], "arch": loaded.meta["model"]["arch"], "inputs": inputs, "outputs": outputs,
            "preprocess": _preprocess_note(wrapper), "classes": list(info.classes), "data_info": info.to_dict(),
            "source_run": str(loaded.run.root)}
    if merged_from:
        meta["merged_from"] = merged_from
    write_json(folder / "model.json", meta)  # last: the export is complete
    return folder


def _graph_for(loaded: LoadedRun, model: nn.Module) -> tuple[nn.Module, tuple, list[dict], list[dict]]:
    """The module to trace, an example input, and the input/output descriptions for model.json."""
    info, pre = loaded.info, loaded.preprocess
    regression = info.target == "regression"
    if isinstance(model, RNNClassifier) and model.embed is not None:
        raise ZerotuneError("--format onnx: an rnn on token ids packs its sequences, which ONNX export cannot "
                            "trace; use --format safetensors", path=loaded.run.root)
    if info.kind != "tokens":
        shape = ["batch", *info.input_shape]
        example = (torch.randn(2, *info.input_shape),)
        inputs = [{"name": "input", "dtype": "float32", "shape": shape}]
        outputs = [{"name": "values" if regression else "logits", "dtype": "float32",
                    "shape": ["batch", info.n_outputs]}]
        return RawFeatures(model, pre, regression), example, inputs, outputs
    T = min(8, _max_length(model))  # an example length; the graph takes any up to the maximum
    ids = {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    mask = {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}
    example_ids = torch.ones(2, T, dtype=torch.long)
    if isinstance(model, GPT):
        outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", model.config.vocab_size]}]
        return Decoder(model), (example_ids,), [ids], outputs
    if isinstance(model, SequenceClassifier):
        out = {"name": "values" if regression else "logits", "dtype": "float32", "shape": ["batch", info.n_outputs]}
    elif isinstance(model, BERTMaskedLM):
        out = {"name": "logits", "dtype": "float32", "shape": ["batch", "seq", model.body.config.vocab_size]}
    else:
        raise ZerotuneError(f"--format onnx: a {type(model).__name__} on token ids cannot be exported",
                            path=loaded.run.root)
    return RawTokens(model, pre, regression), (example_ids, torch.ones_like(example_ids)), [ids, mask], [out]


def _preprocess_note(wrapper: nn.Module) -> str:
    """How to feed the graph, for model.json."""
    if isinstance(wrapper, Decoder):
        return "none: feed token ids from tokenizer.json"
    note = ("in the graph: feed raw features, (x - mean) / std is applied inside" if isinstance(wrapper, RawFeatures)
            else "none: feed token ids from tokenizer.json and attention_mask (1 real, 0 padding)")
    return note + ("; values come back in the data's units" if wrapper.regression else "")


@contextlib.contextmanager
def _quiet():
    """Hide the exporter's own chatter (tracing warnings, optional torchvision ops): it is not about the run."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _max_length(model: nn.Module) -> int:
    """The longest sequence the model's positions cover: GPT block size or BERT maximum position."""
    body: Any = getattr(model, "body", model)
    if isinstance(body, GPT):
        return body.config.block_size
    if isinstance(body, BERT):
        return body.config.max_position
    raise ZerotuneError(f"--format onnx: a {type(body).__name__} body on token ids cannot be exported")


__all__ = ["export_onnx", "require_onnx"]
