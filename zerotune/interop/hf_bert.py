"""Hugging Face BERT checkpoint folders in and out (BERT, MiniLM, sentence-transformers layouts).

A folder holds ``config.json`` (``model_type: bert``), the weights (read by
:mod:`zerotune.interop.hf_files`: ``model.safetensors``, sharded safetensors, or
``pytorch_model.bin`` with ``torch.load(weights_only=True)``) and the tokenizer (``tokenizer.json``, or ``vocab.txt``
from which a WordPiece tokenizer is built). Tensor names may carry the ``bert.`` prefix
(``BertForMaskedLM`` / ``BertForSequenceClassification``) or not (``BertModel``, the
sentence-transformers MiniLM layout). Old checkpoints' ``LayerNorm.gamma``/``beta`` are read as
``weight``/``bias``.

Name mapping (Hugging Face → zerotune), per layer i:

    embeddings.{word,position,token_type}_embeddings   embeddings.{word,position,token_type}
    embeddings.LayerNorm                               embeddings.norm
    encoder.layer.i.attention.self.{query,key,value}   layers.i.attn.{query,key,value}
    encoder.layer.i.attention.output.dense             layers.i.attn.out
    encoder.layer.i.attention.output.LayerNorm         layers.i.attn_norm
    encoder.layer.i.intermediate.dense                 layers.i.ffn.up
    encoder.layer.i.output.dense                       layers.i.ffn.down
    encoder.layer.i.output.LayerNorm                   layers.i.ffn_norm
    pooler.dense                                       pooler
    cls.predictions.transform.dense / .LayerNorm       transform / transform_norm   (masked LM)
    cls.predictions.bias                               bias                         (masked LM)

Every expected tensor must be present with the right shape; any other tensor is an error,
except the ones Hugging Face itself ignores (``position_ids``) and heads the chosen model does
not have (the NSP head, a classifier, the MLM head when loading the bare encoder).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn

from zerotune.data.tokenizer import load_tokenizer, save_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.files import read_json_object, save_weights, write_json, write_text
from zerotune.finetune.lora import lora_layers, unwrap_lora
from zerotune.interop.hf_files import read_config, read_weights
from zerotune.models.bert import BERT, BERTConfig, BERTMaskedLM

_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}

_LAYER = {
    "attn.query": "attention.self.query",
    "attn.key": "attention.self.key",
    "attn.value": "attention.self.value",
    "attn.out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
_TOP = {
    "embeddings.word": "embeddings.word_embeddings",
    "embeddings.position": "embeddings.position_embeddings",
    "embeddings.token_type": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
    "pooler": "pooler.dense",
}
_MLM = {
    "transform": "cls.predictions.transform.dense",
    "transform_norm": "cls.predictions.transform.LayerNorm",
}
# tensors a BERT checkpoint may carry that the chosen zerotune model has no place for
_IGNORED = re.compile(
    r"^(embeddings\.position_ids|cls\.seq_relationship\..*|classifier\..*|cls\.predictions\..*)$"
)


def encoder_name_to_hf(name: str) -> str:
    """zerotune encoder parameter name → Hugging Face ``BertModel`` name (no ``bert.`` prefix)."""
    module, _, leaf = name.rpartition(".")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    if m and m.group(2) in _LAYER:
        return f"encoder.layer.{m.group(1)}.{_LAYER[m.group(2)]}.{leaf}"
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    raise KeyError(name)


def _hf_names(model: nn.Module) -> dict[str, str]:
    """zerotune state-dict name → Hugging Face name, for a BERT or a BERTMaskedLM."""
    try:
        if isinstance(model, BERT):
            return {k: encoder_name_to_hf(k) for k in model.state_dict()}
        if isinstance(model, BERTMaskedLM):
            out = {}
            for k in model.state_dict():
                if k.startswith("body."):
                    out[k] = "bert." + encoder_name_to_hf(k.removeprefix("body."))
                elif k == "bias":
                    out[k] = "cls.predictions.bias"
                else:
                    module, _, leaf = k.rpartition(".")
                    out[k] = f"{_MLM[module]}.{leaf}"
            return out
    except KeyError as e:
        raise ZerotuneError(f"tensor {e.args[0]!r} has no Hugging Face BERT name") from None
    raise ZerotuneError(
        f"cannot map {type(model).__name__} to Hugging Face BERT names; expected BERT or BERTMaskedLM"
    )


# ---------------------------------------------------------------- reading


def config_from_hf(hf: dict[str, Any], path: Path | str = "config.json") -> BERTConfig:
    """Map a Hugging Face BERT ``config.json`` dict onto :class:`BERTConfig`."""
    if hf.get("model_type") != "bert":
        raise ZerotuneError(f"model_type: expected 'bert', got {hf.get('model_type')!r}", path=path)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ZerotuneError(
            f"position_embedding_type: only 'absolute' is supported, got {hf['position_embedding_type']!r}",
            path=path,
        )
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACT:
        raise ZerotuneError(
            f"hidden_act: unsupported activation {act!r}; supported: {', '.join(_HF_ACT)}", path=path
        )
    keys = {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden",
        "num_hidden_layers": "layers",
        "num_attention_heads": "heads",
        "intermediate_size": "intermediate",
    }
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ZerotuneError(f"{missing[0]}: required key is missing", path=path)
    values = {ours: hf[theirs] for theirs, ours in keys.items()}
    values.update(
        max_position=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        activation=_HF_ACT[act],
    )
    try:
        return BERTConfig(**values)
    except ValueError as e:
        raise ZerotuneError(
            f"unsupported BERT configuration: {str(e).splitlines()[-1].strip()}", path=path
        ) from None


def _normalise(name: str) -> str:
    name = name.removeprefix("bert.")
    if name.endswith("LayerNorm.gamma"):  # checkpoints from the original TF conversion
        return name.removesuffix("gamma") + "weight"
    if name.endswith("LayerNorm.beta"):
        return name.removesuffix("beta") + "bias"
    return name


def matched_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path | str,
                  origin: dict[str, Path] | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face tensors as ``model``'s state dict (BERT or BERTMaskedLM, possibly on the meta
    device: only its names, shapes and dtypes are read), checking names and shapes.

    Errors name the file a tensor came from (``origin``, by its name in ``tensors``), else ``path``.
    """
    theirs, where = {}, {}
    for name, t in tensors.items():
        theirs[_normalise(name)] = t
        where[_normalise(name)] = (origin or {}).get(name, path)
    if "cls.predictions.decoder.bias" in theirs and "cls.predictions.bias" not in theirs:
        theirs["cls.predictions.bias"] = theirs["cls.predictions.decoder.bias"]
    names = {k: v.removeprefix("bert.") for k, v in _hf_names(model).items()}
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, hf_name in names.items():
        if hf_name not in theirs:
            raise ZerotuneError(f"missing tensor {hf_name!r}", path=path)
        t = theirs[hf_name]
        if tuple(t.shape) != tuple(own[ours].shape):
            raise ZerotuneError(
                f"tensor {hf_name!r} has shape {list(t.shape)}, config.json implies {list(own[ours].shape)}",
                path=where.get(hf_name, path),
            )
        if not t.is_floating_point():
            raise ZerotuneError(f"tensor {hf_name!r} has dtype {t.dtype}, expected floating point",
                                path=where.get(hf_name, path))
        out[ours] = t.to(own[ours].dtype)
    used = set(names.values())
    for hf_name in theirs:
        if hf_name not in used and not _IGNORED.match(hf_name):
            raise ZerotuneError(f"unexpected tensor {hf_name!r} (not part of a BERT model)",
                                path=where.get(hf_name, path))
    return out


def load_hf_bert(folder: str | Path, head: str = "encoder") -> tuple[nn.Module, BERTConfig]:
    """Load a Hugging Face BERT folder as a zerotune :class:`BERT` (or :class:`BERTMaskedLM`).

    Args:
        folder: the model folder (``config.json`` + weights).
        head: ``encoder`` for the bare encoder, ``masked_lm`` to also load the MLM head
            (``cls.predictions.*``, as saved by ``BertForMaskedLM``).

    Returns:
        The model in eval mode and the :class:`BERTConfig` that builds its encoder.

    Raises:
        ZerotuneError: not a BERT folder, or a tensor missing, unexpected or mis-shaped.
    """
    folder = Path(folder)
    hf = read_config(folder)
    cfg = config_from_hf(hf, folder / "config.json")
    tensors, origin = read_weights(folder)
    has_pooler = any(_normalise(k) == "pooler.dense.weight" for k in tensors)
    cfg = cfg.model_copy(update={"pooler": has_pooler})
    if head not in ("encoder", "masked_lm"):
        raise ZerotuneError(f"head: expected 'encoder' or 'masked_lm', got {head!r}")

    def build() -> nn.Module:
        return BERT(cfg) if head == "encoder" else BERTMaskedLM(BERT(cfg), hf.get("pad_token_id"))

    files = set(origin.values())
    with torch.device("meta"):  # names and shapes checked before a model of config.json's size is allocated
        matched_state(build(), tensors, files.pop() if len(files) == 1 else folder, origin)
    model = build()
    model.load_state_dict(matched_state(model, tensors, folder, origin), strict=True)
    return model.eval(), cfg


def load_hf_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The folder's tokenizer: ``tokenizer.json`` if present, else WordPiece built from ``vocab.txt``.

    Padding and truncation saved in the file (sentence-transformers pads everything to 128) are
    switched off: zerotune pads batches and cuts to ``data.max_length`` itself.
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if path.is_file():
        tok = load_tokenizer(path)
        tok.no_padding()
        tok.no_truncation()
        return tok
    vocab = folder / "vocab.txt"
    if vocab.is_file():
        lower = True
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            lower = bool(read_json_object(cfg_path).get("do_lower_case", True))
        return wordpiece_from_vocab(vocab, lowercase=lower)
    return None


def wordpiece_from_vocab(path: str | Path, lowercase: bool = True) -> Tokenizer:
    """Build BERT's WordPiece tokenizer (normaliser, pre-tokeniser, [CLS] … [SEP] template) from vocab.txt."""
    path = Path(path)
    try:
        tokens = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ZerotuneError("not a UTF-8 text file", path=path) from None
    vocab = {tok: i for i, tok in enumerate(tokens) if tok}
    for special in ("[UNK]", "[CLS]", "[SEP]"):
        if special not in vocab:
            raise ZerotuneError(f"special token {special} missing from the vocabulary", path=path)
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


# ---------------------------------------------------------------- writing


def config_to_hf(cfg: BERTConfig, architecture: str = "BertModel", pad_id: int = 0) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict for a zerotune :class:`BERTConfig`."""
    return {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.intermediate,
        "hidden_act": _ACT_HF[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "pad_token_id": pad_id,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


def save_hf_bert(model: nn.Module, folder: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` as a Hugging Face BERT folder that ``transformers.AutoModel`` loads.

    A :class:`BERT` is written as ``BertModel``; a :class:`BERTMaskedLM` as ``BertForMaskedLM``
    (``bert.``-prefixed names plus ``cls.predictions.*``); any other model with a ``body`` that is a
    BERT (a sequence or token classifier) writes its encoder. LoRA adapters are merged into a copy
    first, so the written weights are plain BERT weights and ``model`` itself is left as it is.

    Returns:
        The folder.
    """
    pad_id = getattr(model, "pad_id", None)
    if not isinstance(model, (BERT, BERTMaskedLM)) and isinstance(getattr(model, "body", None), BERT):
        model = model.body
    if lora_layers(model):
        model = unwrap_lora(copy.deepcopy(model))
    names = _hf_names(model)
    body = model if isinstance(model, BERT) else model.body
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {names[k]: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if isinstance(model, BERTMaskedLM):
        # the tied decoder: safetensors stores each tensor once, so write an explicit copy
        tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"].clone()
    architecture = "BertForMaskedLM" if isinstance(model, BERTMaskedLM) else "BertModel"
    hf_cfg = config_to_hf(body.config, architecture, pad_id if pad_id is not None else _pad_id(tokenizer))
    save_weights(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    write_json(folder / "config.json", hf_cfg, indent=2)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, folder)
    return folder


def _pad_id(tokenizer: Tokenizer | None) -> int:
    if tokenizer is not None and tokenizer.token_to_id("[PAD]") is not None:
        return tokenizer.token_to_id("[PAD]")
    return 0


def save_hf_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> None:
    """Write ``tokenizer.json``, ``vocab.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    folder = Path(folder)
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    write_text(folder / "vocab.txt", "".join(tok + "\n" for tok, _ in by_id))
    specials = {
        k: v
        for k, v in {
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        }.items()
        if v in vocab
    }
    lower = _lowercases(tokenizer)
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lower, "model_max_length": 512, **specials}
    write_json(folder / "tokenizer_config.json", config, indent=2)
    write_json(folder / "special_tokens_map.json", specials, indent=2)


def _lowercases(tokenizer: Tokenizer) -> bool:
    norm = json.loads(tokenizer.to_str()).get("normalizer") or {}
    return bool(norm.get("lowercase", False))
