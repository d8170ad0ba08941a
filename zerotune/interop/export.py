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

from pathlib import Path

from torch import nn

from zerotune.config import ChatTemplate
from zerotune.data.chat import jinja_template, load_chat_template
from zerotune.data.tokenizer import save_tokenizer, special_ids
from zerotune.errors import ZerotuneError
from zerotune.files import check_output, copy_file, save_weights, staged_folder, write_json
from zerotune.interop.hf_bert import save_hf_bert
from zerotune.interop.hf_decoder import export_hf_decoder, family_of
from zerotune.interop.onnx_export import export_onnx, require_onnx
from zerotune.load import LoadedRun, load_plain, model_inputs
from zerotune.models.bert import BERT, BERTMaskedLM
from zerotune.models.gpt import GPT
from zerotune.models.heads import SequenceClassifier
from zerotune.run import Run, open_run, write_model_json

FORMATS = ("hf", "safetensors", "onnx")


def export(run: str | Path, format: str = "hf", out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Export a run's final model (LoRA merged) as a Hugging Face folder, zerotune safetensors or ONNX.

    Args:
        run: the run folder.
        format: ``hf``, ``safetensors`` or ``onnx`` (see the module docstring).
        out: the folder to write (default ``RUN/export-FORMAT``). An earlier export there is replaced only with
            ``overwrite``; a folder that is not an export, or that holds the run's files, never. The export is
            written beside it and put in place at the end, so a failure leaves an earlier one as it was.

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
        require_onnx()  # before anything is loaded or written
    source = open_run(run)
    root = Path(out or source.root / f"export-{format}")
    check_output(root, overwrite=overwrite, inputs=model_inputs(source), kind="export folder",
                 recognise=is_export_folder)
    loaded, meta = load_plain(run)
    model = loaded.model
    if format == "hf":
        _check_hf(model, meta["model"]["arch"], loaded.run.root)
    with staged_folder(root) as folder:
        if format == "onnx":
            export_onnx(loaded, model, folder, meta.get("merged_from"))
        elif format == "safetensors":
            _export_safetensors(loaded, meta, Run(folder))
        elif isinstance(model, GPT):
            ids = special_ids(loaded.tokenizer) if loaded.tokenizer is not None else {}
            export_hf_decoder(model, model.config, folder, bos_id=ids.get("bos"), eos_id=ids.get("eos"),
                              pad_id=ids.get("pad"))
            if loaded.tokenizer is not None:
                chat = load_chat_template(source.chat_template) if source.chat_template.is_file() else None
                _save_fast_tokenizer(loaded.tokenizer, folder, ids, chat)
        else:
            _export_hf_bert(loaded, model, folder)
    return root


def is_export_folder(folder: Path) -> bool:
    """A folder an export wrote (model.json or a Hugging Face config.json; no run's checkpoints or metrics),
    which --overwrite may replace."""
    made = (folder / "model.json").is_file() or (folder / "config.json").is_file()
    return made and not (folder / "checkpoints").exists() and not (folder / "metrics.jsonl").exists()


def _export_hf_bert(loaded: LoadedRun, model: nn.Module, folder: Path) -> None:
    save_hf_bert(model, folder, loaded.tokenizer)
    if isinstance(model, SequenceClassifier):
        save_weights(folder / "head.safetensors", {k: v for k, v in model.head.state_dict().items()},
                     metadata={"format": "pt"})
        info = loaded.info
        head = {"pooling": model.pooling, "pad_id": model.pad_id, "target": info.target, "classes": info.classes,
                "formula": "logits = head.weight @ pool(last_hidden_state, attention_mask) + head.bias"}
        write_json(folder / "head.json", head)


def _check_hf(model: nn.Module, arch: str, root: Path) -> None:
    if isinstance(model, GPT):
        family_of(model.config)  # raises for a layout no Hugging Face family has
        return
    is_bert = isinstance(model, (BERT, BERTMaskedLM)) or isinstance(getattr(model, "body", None), BERT)
    if not is_bert:
        kind = "a GPT sequence classifier" if arch == "gpt" else f"a {arch} model"
        raise ZerotuneError(f"--format hf: {kind} has no Hugging Face counterpart; use --format safetensors",
                            path=root)


def _export_safetensors(loaded: LoadedRun, meta: dict, new: Run) -> None:
    run = loaded.run
    save_weights(new.weights, loaded.model.state_dict(), metadata={"format": "pt"})
    copy_file(run.config, new.config)
    if run.tokenizer.is_file():
        copy_file(run.tokenizer, new.tokenizer)
    write_model_json(new, meta)  # last: the export is complete


def _save_fast_tokenizer(tokenizer, folder: Path, ids: dict, template: ChatTemplate | None) -> None:
    """tokenizer.json plus the tokenizer_config.json that lets ``AutoTokenizer`` load it as a fast tokenizer
    (with an instruction-tuned run's chat template, which ``apply_chat_template`` then uses)."""
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key in ("bos", "eos", "pad", "unk"):
        if ids.get(key) is not None:
            config[f"{key}_token"] = tokenizer.id_to_token(ids[key])
    if template is not None:
        config["chat_template"] = jinja_template(template)
        config["eos_token"] = template.end  # generation ends a turn there
    write_json(folder / "tokenizer_config.json", config, indent=2)


__all__ = ["export", "FORMATS"]
