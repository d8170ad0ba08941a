"""Tokenizer training, loading and special-token lookup, checked by round trips and by hand."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from zerotune.data.tokenizer import (
    CHAT_TOKENS,
    KINDS,
    SPECIAL_TOKENS,
    load_tokenizer,
    special_ids,
    train_tokenizer,
)
from zerotune.errors import ZerotuneError

DOCS = [
    "The quick brown fox jumps over the lazy dog.\nThe dog sleeps.",
    "def add(a, b):\n\treturn a + b  # two spaces before the comment\n",
    "Unicode: café, naïve, Straße, 東京, emoji 😀 and a literal <|eos|> marker.",
    "  leading spaces, trailing spaces  \n\n\nand blank lines",
] + [f"Sentence number {i} repeats the words fox, dog and lazy {i % 3} times." for i in range(30)]


def corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    return f"jsonl:{path}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Tokenizer]:
    tmp = tmp_path_factory.mktemp("tok")
    spec = corpus(tmp)
    return {
        kind: load_tokenizer(train_tokenizer(spec, 400, tmp / kind, kind=kind, progress=False))
        for kind in KINDS
    }


@pytest.mark.parametrize("kind", ["bytelevel-bpe", "bpe", "char"])
def test_round_trip_is_exact(trained, kind):
    tok = Tokenizer.from_str(trained[kind].to_str())
    tok.encode_special_tokens = True  # the literal "<|eos|>" in DOCS[2] is text, as in token shards
    for doc in DOCS:
        ids = tok.encode(doc, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == doc


def test_bytelevel_round_trip_of_unseen_text_has_no_unknowns(trained):
    tok = trained["bytelevel-bpe"]
    text = "Ünseen: ελληνικά 🦀\u200b\x00 \r\n"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert special_ids(tok)["unk"] not in ids


def test_wordpiece_round_trip_up_to_spacing(trained):
    tok = trained["wordpiece"]
    text = "The lazy dog jumps over the quick brown fox."
    assert tok.decode(tok.encode(text).ids) == text
    messy = "The  quick\nbrown\tfox."
    assert tok.decode(tok.encode(messy).ids) == "The quick brown fox."


def test_bpe_vocab_size_is_honoured_and_merges_shorten_text(trained):
    assert trained["bytelevel-bpe"].get_vocab_size() == 400
    for kind in ("bytelevel-bpe", "bpe", "wordpiece"):
        tok = trained[kind]
        assert tok.get_vocab_size() <= 400, kind  # the small corpus may run out of merges first
        n_tokens = len(tok.encode(DOCS[0]).ids)
        assert n_tokens < len(DOCS[0]) / 2, kind  # merged pieces, not single characters


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_first_and_found_by_role(trained, kind):
    tok = trained[kind]
    names = SPECIAL_TOKENS + CHAT_TOKENS
    assert [tok.token_to_id(n) for n in names] == list(range(len(names)))
    assert special_ids(tok) == {"bos": 2, "eos": 3, "pad": 0, "unk": 1, "mask": 4}
    assert tok.encode("hi <|user|> there").ids.count(6) == 1  # recognised when encoding chat text


def test_char_vocabulary_is_every_distinct_character(trained, tmp_path):
    tok = trained["char"]
    chars = set("".join(DOCS))
    vocab = tok.get_vocab()
    assert set(vocab) == chars | set(SPECIAL_TOKENS + CHAT_TOKENS)  # "<", "|" learnt from the literal
    assert all(len(t) == 1 for t in vocab if t not in SPECIAL_TOKENS + CHAT_TOKENS)

    # a smaller vocabulary keeps the most frequent characters, the rest become <|unk|>
    n_special = len(SPECIAL_TOKENS + CHAT_TOKENS)
    small = load_tokenizer(
        train_tokenizer(corpus(tmp_path), n_special + 10, tmp_path, kind="char", progress=False)
    )
    counts = Counter("".join(DOCS)).most_common()
    top = {c for c, n in counts[:10]}
    assert counts[9][1] > counts[10][1]  # no tie at the cut, so the expected set is unique
    assert set(small.get_vocab()) == top | set(SPECIAL_TOKENS + CHAT_TOKENS)
    rare = counts[-1][0]
    assert small.encode(rare).ids == [1]


def test_matches_transformers_fast_tokenizer(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tokenizer.json"
    trained["bytelevel-bpe"].save(str(path))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    ours = load_tokenizer(path)
    for doc in DOCS[:2]:
        assert (
            hf(doc, add_special_tokens=False)["input_ids"] == ours.encode(doc, add_special_tokens=False).ids
        )
        assert hf.decode(ours.encode(doc).ids) == doc


def test_training_is_deterministic(tmp_path):
    spec = corpus(tmp_path)
    a = train_tokenizer(spec, 350, tmp_path / "a", progress=False)
    b = train_tokenizer(spec, 350, tmp_path / "b", progress=False)
    assert a == tmp_path / "a" / "tokenizer.json"
    assert a.read_bytes() == b.read_bytes()


def test_text_dir_and_builtin_inputs(tmp_path):
    (tmp_path / "docs").mkdir()
    for i, d in enumerate(DOCS):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    tok = load_tokenizer(train_tokenizer(f"text:{tmp_path / 'docs'}", 300, tmp_path / "t", progress=False))
    assert tok.decode(tok.encode(DOCS[1]).ids) == DOCS[1]
    pydoc = load_tokenizer(train_tokenizer("builtin:pydoc", 500, tmp_path / "p", progress=False))
    assert pydoc.get_vocab_size() == 500


def gpt2_like(tmp_path: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(DOCS, trainer)
    folder = tmp_path / "gpt2"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def bert_like(tmp_path: Path) -> Path:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    tok.train_from_iterator(DOCS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path = tmp_path / "bert-tokenizer.json"
    tok.save(str(path))
    return path


def llama_like(tmp_path: Path) -> Path:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(DOCS, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_foreign_tokenizers_load_and_map_special_roles(tmp_path):
    gpt2 = load_tokenizer(gpt2_like(tmp_path))
    assert special_ids(gpt2) == {"bos": 0, "eos": 0, "pad": None, "unk": None, "mask": None}
    assert gpt2.decode(gpt2.encode(DOCS[0]).ids) == DOCS[0]

    bert = load_tokenizer(bert_like(tmp_path))
    assert special_ids(bert) == {"bos": 2, "eos": 3, "pad": 0, "unk": 1, "mask": 4}
    assert bert.encode("the dog").ids[0] == 2  # its own post-processor still applies

    llama = load_tokenizer(llama_like(tmp_path))
    assert special_ids(llama) == {"bos": 1, "eos": 2, "pad": None, "unk": 0, "mask": None}


def test_unk_found_through_the_model_when_named_differently(tmp_path):
    tok = Tokenizer(models.WordLevel({"<oov>": 0, "a": 1}, unk_token="<oov>"))
    assert special_ids(tok)["unk"] == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"tokenizer file not found"),
        (b"\xff\xfe not text", r"not a tokenizer\.json \(not UTF-8 text\)"),
        (b'{"model": ', r"not a tokenizer\.json \(invalid JSON"),
        (b'{"version": "1.0"}', r"not a tokenizer\.json \(no 'model' section\)"),
        (b'{"version": "1.0", "model": {"type": "Telepathy"}}', r"not a valid tokenizer\.json \("),
    ],
)
def test_bad_tokenizer_file_is_one_clean_error(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ZerotuneError, match=r"tokenizer\.json: " + message):
        load_tokenizer(tmp_path)  # the folder: tokenizer.json inside it is the file named


def test_train_errors(tmp_path):
    spec = corpus(tmp_path)
    with pytest.raises(ZerotuneError, match=r"unknown tokenizer kind 'unigram'"):
        train_tokenizer(spec, 400, tmp_path / "x", kind="unigram")
    with pytest.raises(ZerotuneError, match=r"vocab_size 200 is too small for a bytelevel-bpe tokenizer"):
        train_tokenizer(spec, 200, tmp_path / "x")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ZerotuneError, match=r"no documents to train on"):
        train_tokenizer(f"jsonl:{empty}", 300, tmp_path / "x", progress=False)
    assert not (tmp_path / "x" / "tokenizer.json").exists()
    train_tokenizer(spec, 300, tmp_path / "x", progress=False)
    with pytest.raises(ZerotuneError, match=r"x/tokenizer\.json: already exists"):
        train_tokenizer(spec, 300, tmp_path / "x", progress=False)
    train_tokenizer(spec, 300, tmp_path / "x", progress=False, overwrite=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n', encoding="utf-8")
    with pytest.raises(ZerotuneError, match=r"bad\.jsonl: line 2: no field 'text'"):
        train_tokenizer(f"jsonl:{bad}", 300, tmp_path / "y", progress=False)


def test_a_char_tokenizer_needs_no_vocab_size(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcabc xyz\n")
    tok = load_tokenizer(train_tokenizer(f"text:{corpus}", None, tmp_path / "t", kind="char", progress=False))
    assert tok.get_vocab_size() == 9 + len(set("abcabc xyz\n"))  # the special tokens, then every character
    with pytest.raises(ZerotuneError, match="vocab_size: required for a bpe tokenizer"):
        train_tokenizer(f"text:{corpus}", None, tmp_path / "t2", kind="bpe", progress=False)
