"""``zerotune export RUN --format hf|safetensors|onnx --out DIR``: a run's final model, self-contained.

LoRA adapters are merged into the base first (W ← W + (α/r) B A), so what is written is a plain
model that needs neither the base nor zerotune's LoRA code.

    safetensors   zerotune's own layout: model.safetensors (merged), model.json, config.yaml,
                  tokenizer.json. ``load_run(DIR)`` (and so evaluate/predict/generate) opens it.
    hf            a Hugging Face folder that ``transformers`` Auto classes load:
                    gpt (GPT-2 / Llama / Qwen2 layouts)   config.json + model.safetensors + tokenizer
                                                          (AutoModelForCausalLM)
                    bert encoder, masked LM               BertModel / BertForMaskedLM (AutoModel...)
                    bert sequence classifier              the encoder as BertModel, plus the head as
                                                          ``head.safetensors`` + ``head.json``: zerotune
                                                          pools mean/cls over the last hidden states,
                                                          which BertForSequenceClassification (tanh
                                                          pooler on [CLS]) cannot express
                  classic nets (mlp, cnn, resnet, rnn) and GPT classifiers have no Hugging Face
                  counterpart: use ``safetensors``.
    onnx          model.onnx taking raw inputs (the run's normalisation is in the graph), model.json,
                  labels.json, tokenizer.json; see ``zerotune.interop.onnx_export``. Needs the
                  ``onnx`` and ``onnxscript`` packages (``pip install 'zerotune[onnx]'``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.finetune.heads import SequenceClassifier
from zerotune.finetune.lora import lora_layers, unwrap_lora
from zerotune.models.bert import BERT, BERTMaskedLM
from zerotune.models.gpt import GPT
from zerotune.run import LoadedRun, create_run, load_run
from zerotune.train.checkpoint import atomic_write_text, save_weights

FORMATS = ("hf", "safetensors", "onnx")


def export(run: str | Path, format: str = "hf", out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Export a run's final model (LoRA merged) as a Hugging Face folder, zerotune safetensors or ONNX.

    Args:
        run: the run folder.
        format: ``hf``, ``safetensors`` or ``onnx`` (see the module docstring).
        out: the folder to write (default ``RUN/export-FORMAT``); an existing non-empty one needs ``overwrite``.

    Returns:
        The folder written.

    Raises:
        ZerotuneError: unknown format, a model with no Hugging Face counterpart, a model ONNX export
            cannot trace, missing ONNX packages, or a bad run.

    Example:
        >>> export("runs/minilm-lora", "hf", "exports/minilm-clf")
    """
    if format not in FORMATS:
        raise ZerotuneError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    if format == "onnx":
        from zerotune.interop.onnx_export import require_onnx

        require_onnx()  # before anything is loaded or written
    loaded, meta = load_plain(run)
    model = loaded.model
    arch = meta["model"]["arch"]
    if format == "hf":
        _check_hf(model, arch, loaded.run.root)
    if format == "onnx":
        from zerotune.interop.onnx_export import export_onnx

        return export_onnx(loaded, model, Path(out or loaded.run.root / "export-onnx"), overwrite,
                           meta.get("merged_from"))
    folder = create_run(out or loaded.run.root / f"export-{format}", overwrite).root
    if format == "safetensors":
        return _export_safetensors(loaded, meta, folder)
    if isinstance(model, GPT):
        from zerotune.data.tokenizer import special_ids
        from zerotune.interop.hf_decoder import export_hf_decoder

        ids = special_ids(loaded.tokenizer) if loaded.tokenizer is not None else {}
        export_hf_decoder(model, model.config, folder, bos_id=ids.get("bos"), eos_id=ids.get("eos"),
                          pad_id=ids.get("pad"))
        if loaded.tokenizer is not None:
            _save_fast_tokenizer(loaded.tokenizer, folder, ids)
        return folder
    from zerotune.interop.hf_bert import save_hf_bert

    save_hf_bert(model, folder, loaded.tokenizer)
    if isinstance(model, SequenceClassifier):
        save_weights(folder / "head.safetensors", {k: v for k, v in model.head.state_dict().items()},
                     metadata={"format": "pt"})
        info = loaded.info
        head = {"pooling": model.pooling, "pad_id": model.pad_id, "target": info.target, "classes": info.classes,
                "formula": "logits = head.weight @ pool(last_hidden_state, attention_mask) + head.bias"}
        atomic_write_text(folder / "head.json", json.dumps(head, indent=1))
    return folder


def _check_hf(model: nn.Module, arch: str, root: Path) -> None:
    if isinstance(model, GPT):
        from zerotune.interop.hf_decoder import _family_of

        _family_of(model.config)  # raises for a layout no Hugging Face family has
        return
    is_bert = isinstance(model, (BERT, BERTMaskedLM)) or isinstance(getattr(model, "body", None), BERT)
    if not is_bert:
        kind = "a GPT sequence classifier" if arch == "gpt" else f"a {arch} model"
        raise ZerotuneError(f"--format hf: {kind} has no Hugging Face counterpart; use --format safetensors",
                            path=root)


def _export_safetensors(loaded, meta: dict, folder: Path) -> Path:
    run = loaded.run
    save_weights(folder / "model.safetensors", loaded.model.state_dict(), metadata={"format": "pt"})
    shutil.copyfile(run.config, folder / "config.yaml")
    if run.tokenizer.is_file():
        shutil.copyfile(run.tokenizer, folder / "tokenizer.json")
    atomic_write_text(folder / "model.json", json.dumps(meta, indent=1))  # last: the export is complete
    return folder


def load_plain(run: str | Path) -> tuple[LoadedRun, dict]:
    """The run loaded as a plain float model, and its model.json: LoRA adapters merged in place
    (W ← W + (α/r) B A; a QLoRA base is dequantized first), int8 weights already dequantized."""
    loaded = load_run(run)
    merged = bool(lora_layers(loaded.model))
    if merged:
        if loaded.meta.get("method") == "qlora":  # the base is 4/8-bit: back to nn.Linear before merging
            from zerotune.finetune.qlora import dequantize_model

            dequantize_model(loaded.model)
        unwrap_lora(loaded.model)
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


def _save_fast_tokenizer(tokenizer, folder: Path, ids: dict) -> None:
    """tokenizer.json plus the tokenizer_config.json that lets ``AutoTokenizer`` load it as a fast tokenizer."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key in ("bos", "eos", "pad", "unk"):
        if ids.get(key) is not None:
            config[f"{key}_token"] = tokenizer.id_to_token(ids[key])
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


__all__ = ["export", "plain_meta", "FORMATS"]
