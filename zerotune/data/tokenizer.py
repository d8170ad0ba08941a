"""Train, load and inspect tokenizers (Hugging Face ``tokenizers``, saved as ``tokenizer.json``).

Four kinds, all trained in Rust by ``tokenizers`` on a streamed corpus (:func:`iter_documents`):

    bytelevel-bpe  GPT-2 style: text → UTF-8 bytes → BPE merges. Every string encodes (no unknown
                   token) and decodes back to exactly the input.
    bpe            BPE over Unicode characters (NFC), spaces kept as ``▁`` (SentencePiece style);
                   decodes back exactly when every character was seen in training, else ``<|unk|>``.
    wordpiece      BERT style: split at whitespace and punctuation, words → ``##`` pieces; decoding
                   rejoins words with single spaces.
    char           one token per character: every distinct character of the corpus, the most
                   frequent first when ``vocab_size`` is smaller than the alphabet.

Every trained vocabulary starts with the same special tokens, in this order (ids 0..8):
``<|pad|> <|unk|> <|bos|> <|eos|> <|mask|>`` and the reserved chat tokens
``<|system|> <|user|> <|assistant|> <|end|>``. Encoding adds no special tokens by itself;
callers append ``<|eos|>`` where a document ends.

Literal special-token strings inside the corpus are learnt as ordinary text, so the data can
never inject a control token (token shards are encoded the same way).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from zerotune.data.base import spec_path
from zerotune.data.text import iter_documents
from zerotune.errors import ZerotuneError
from zerotune.files import atomic_write, check_output_file

SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|bos|>", "<|eos|>", "<|mask|>"]
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
KINDS = ("bytelevel-bpe", "bpe", "wordpiece", "char")
CHAR_LIMIT = 2**24  # a char tokenizer without vocab_size keeps every distinct character, up to this many
UNK = "<|unk|>"

# Names under which other tokenizers (GPT-2, Llama, BERT, RoBERTa, Gemma, ...) keep the same roles.
SPECIAL_NAMES = {
    "bos": ["<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>"],
    "eos": ["<|eos|>", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"],
    "pad": ["<|pad|>", "<pad>", "[PAD]", "<|padding|>"],
    "unk": ["<|unk|>", "<unk>", "[UNK]"],
    "mask": ["<|mask|>", "<mask>", "[MASK]"],
}


def _new_tokenizer(kind: str, vocab_size: int, min_frequency: int, progress: bool):
    special = SPECIAL_TOKENS + CHAT_TOKENS
    if kind == "bytelevel-bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
            show_progress=progress,
        )
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.NFC()
        # "never" adds no leading ▁, so decoding gives back the text exactly
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tok.decoder = decoders.Metaspace(prepend_scheme="never")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special, show_progress=progress
        )
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special, show_progress=progress
        )
    else:  # char: each code point is a "word" of a word-level vocabulary
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=0, special_tokens=special, show_progress=progress
        )
    return tok, trainer


def train_tokenizer(
    input_spec: str,
    vocab_size: int | None,
    out_dir: str | Path,
    kind: str = "bytelevel-bpe",
    text_field: str = "text",
    *,
    min_frequency: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Train a tokenizer on a text spec and save ``out_dir/tokenizer.json``.

    Args:
        input_spec: a text spec (``text:DIR``, ``jsonl:FILE``, ``builtin:pydoc`` ...).
        vocab_size: the size of the vocabulary, special tokens included; None (``char`` only) keeps every
            distinct character of the corpus.
        out_dir: folder to write ``tokenizer.json`` into (created if needed).
        kind: ``bytelevel-bpe``, ``bpe``, ``wordpiece`` or ``char`` (see the module docstring).
        text_field: the text field of ``jsonl`` records.
        min_frequency: merges/words seen fewer times than this are not learnt.
        progress: show the trainer's progress bars on stderr.
        overwrite: replace an existing ``tokenizer.json`` (never a run's or a shard folder's, and never
            inside the corpus).

    Returns:
        The path of the saved ``tokenizer.json``.

    Raises:
        ZerotuneError: bad kind or vocab size, unreadable or empty corpus, existing output.

    Example:
        >>> zerotune.train_tokenizer("builtin:pydoc", 2048, "runs/tok")   # -> runs/tok/tokenizer.json
    """
    if kind not in KINDS:
        raise ZerotuneError(f"unknown tokenizer kind {kind!r}; choose from {', '.join(KINDS)}")
    n_special = len(SPECIAL_TOKENS) + len(CHAT_TOKENS)
    smallest = n_special + (256 if kind == "bytelevel-bpe" else 1)
    if vocab_size is None and kind == "char":
        vocab_size = CHAR_LIMIT  # the alphabet decides
    if vocab_size is None:
        raise ZerotuneError(f"vocab_size: required for a {kind} tokenizer (only char takes the corpus's alphabet)")
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ZerotuneError(
            f"vocab_size {vocab_size} is too small for a {kind} tokenizer: it needs at least {smallest} "
            f"({n_special} special tokens" + (" + 256 bytes)" if kind == "bytelevel-bpe" else " + 1)")
        )
    out_dir = Path(out_dir)
    path = out_dir / "tokenizer.json"
    corpus = spec_path(input_spec)
    check_output_file(path, overwrite=overwrite, inputs=[corpus] if corpus else [])
    if any((out_dir / name).exists() for name in ("config.yaml", "model.json", "index.json")):
        raise ZerotuneError("holds a run or token shards, whose tokenizer.json is theirs; choose another --out",
                            path=out_dir)
    documents = iter_documents(input_spec, text_field)
    n_docs = 0

    def counted():
        nonlocal n_docs
        for doc in documents:
            n_docs += 1
            yield doc

    tok, trainer = _new_tokenizer(kind, vocab_size, min_frequency, progress)
    tok.encode_special_tokens = True  # learn literal "<|eos|>" in the corpus as plain text
    tok.train_from_iterator(counted(), trainer)
    tok.encode_special_tokens = False
    if n_docs == 0:
        raise ZerotuneError(f"text spec {input_spec!r}: no documents to train on")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, path)
    return path


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write ``tokenizer.json`` atomically: a crash never leaves a half-written file."""
    atomic_write(path, lambda p: tok.save(str(p)))


def tokenizer_file(path_or_dir: str | Path) -> Path:
    """The ``tokenizer.json`` a path names: the file itself, or ``DIR/tokenizer.json``."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ZerotuneError("tokenizer file not found", path=path)
    return path


def load_tokenizer(path_or_dir: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (zerotune's or any Hugging Face one) from a file or its folder.

    Raises:
        ZerotuneError: missing file, or a file that is not a valid ``tokenizer.json``.
    """
    path = tokenizer_file(path_or_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ZerotuneError("not a tokenizer.json (not UTF-8 text)", path=path) from None
    except OSError as e:
        raise ZerotuneError(f"cannot read ({e.strerror})", path=path) from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ZerotuneError(
            f"not a tokenizer.json (invalid JSON: {e.msg} at line {e.lineno})", path=path
        ) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ZerotuneError("not a tokenizer.json (no 'model' section)", path=path)
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers reports every parse problem as a plain Exception
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ZerotuneError(f"not a valid tokenizer.json ({reason})", path=path) from None


def special_ids(tok: Tokenizer) -> dict[str, int | None]:
    """Ids of the special tokens by role: ``bos``, ``eos``, ``pad``, ``unk``, ``mask`` (None when absent).

    zerotune's own names come first; the names other tokenizers use for the same role
    (``<|endoftext|>``, ``<s>``, ``</s>``, ``[CLS]``, ``[SEP]``, ``[PAD]``, ``[UNK]``, ``<unk>``,
    ``<pad>`` ...) are recognised too. GPT-2's single ``<|endoftext|>`` is both bos and eos.
    """
    ids: dict[str, int | None] = {}
    for role, names in SPECIAL_NAMES.items():
        ids[role] = next((i for i in map(tok.token_to_id, names) if i is not None), None)
    if ids["unk"] is None:
        unk = getattr(tok.model, "unk_token", None)
        ids["unk"] = tok.token_to_id(unk) if unk else None
    return ids
