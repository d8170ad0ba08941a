"""Token shards: exact contents, filters, splits, determinism, windows and clear errors."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from zerotune.data.shards import ShardDataset, prepare
from zerotune.data.text import split_document
from zerotune.data.tokenizer import train_tokenizer
from zerotune.errors import ZerotuneError

BODY = [
    f"Document {i}: the fox and the dog {'run' if i % 2 else 'sleep'} for {i} minutes." for i in range(40)
]
SPECIAL_TEXT = "A literal <|eos|> inside a document stays text."


def write_jsonl(path: Path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return f"jsonl:{path}"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    spec = write_jsonl(tmp / "train.jsonl", BODY + [SPECIAL_TEXT, "café Straße 東京"])
    return train_tokenizer(spec, 320, tmp / "tok", progress=False).parent


def reference_tokenizer(tok_dir: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.encode_special_tokens = True
    return tok


def read_split(out: Path, split: str) -> np.ndarray:
    index = json.loads((out / "index.json").read_text())
    dtype = np.dtype(index["dtype"])
    parts = [np.fromfile(out / s["file"], dtype=dtype) for s in index["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def split_docs(stream: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(stream == eos)
    assert len(stream) == 0 or ends[-1] == len(stream) - 1  # every document ends with eos
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s:e].tolist() for s, e in zip(starts, ends, strict=True)]


def test_shards_equal_direct_encoding_plus_eos_and_splits_are_disjoint(tmp_path, tok_dir):
    docs = BODY + [SPECIAL_TEXT, "cafe\u0301 au lait"]  # decomposed é: stored NFC
    out = tmp_path / "shards"
    counts = prepare(write_jsonl(tmp_path / "c.jsonl", docs), tok_dir, out, val_fraction=0.3, progress=False)

    ref = reference_tokenizer(tok_dir)
    eos = ref.token_to_id("<|eos|>")
    texts = [unicodedata.normalize("NFC", d) for d in docs]
    expected = [ref.encode(t, add_special_tokens=False).ids for t in texts]
    assert "café au lait" in texts
    train = split_docs(read_split(out, "train"), eos)
    val = split_docs(read_split(out, "val"), eos)
    # each stored document is one expected document, each split keeps corpus order, none is in both
    where = {ref.decode(d, skip_special_tokens=False): d for d in train + val}
    assert len(where) == len(docs) == len(train) + len(val)
    train_ids = [texts.index(ref.decode(d, skip_special_tokens=False)) for d in train]
    val_ids = [texts.index(ref.decode(d, skip_special_tokens=False)) for d in val]
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)
    assert set(train_ids).isdisjoint(val_ids) and set(train_ids) | set(val_ids) == set(range(len(docs)))
    assert [expected[i] for i in train_ids] == train and [expected[i] for i in val_ids] == val
    assert 5 <= len(val) <= 22  # about 30% of 42
    assert counts["train_documents"] == len(train) and counts["val_documents"] == len(val)
    assert counts["train_tokens"] == sum(len(d) + 1 for d in train)

    special = expected[texts.index(SPECIAL_TEXT)]
    assert eos not in special  # the literal marker was encoded as text, not as the control token
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()

    ds = ShardDataset(out, "val")
    assert ds.n_tokens == sum(len(d) + 1 for d in val) and ds.n_documents == len(val)
    assert ds.vocab_size == 320 and ds.eos_id == eos and ds.tokenizer_path == out / "tokenizer.json"


def test_filter_and_duplicate_counts(tmp_path, tok_dir):
    docs = [
        "alpha document one",
        "",  # too short
        "alpha document one",  # duplicate
        "café au lait",
        "cafe\u0301 au lait",  # duplicate once NFC-normalised
        "x",  # too short for min_chars=2
        "y" * 500,  # too long for max_chars=200
        "y" * 200,  # exactly max_chars: kept
        "beta document two",
    ]
    spec = write_jsonl(tmp_path / "c.jsonl", docs)
    counts = prepare(
        spec, tok_dir, tmp_path / "out", min_chars=2, max_chars=200, val_fraction=0, progress=False
    )
    assert {k: counts[k] for k in ("read", "kept", "duplicate", "too_short", "too_long")} == {
        "read": 9,
        "kept": 4,
        "duplicate": 2,
        "too_short": 2,
        "too_long": 1,
    }
    assert counts["bytes"] == 18 + 13 + 200 + 17  # UTF-8 bytes of the kept documents ("é" is 2)
    assert counts["val_documents"] == 0 and counts["train_documents"] == 4
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["counts"]["duplicate"] == 2 and index["splits"]["val"] == {
        "tokens": 0,
        "documents": 0,
        "shards": [],
    }


def test_output_is_byte_identical_across_runs_and_shards_are_exact(tmp_path, tok_dir):
    spec = write_jsonl(tmp_path / "c.jsonl", BODY)
    kw = dict(val_fraction=0.2, seed=7, shard_tokens=97, batch_docs=3, progress=False)
    prepare(spec, tok_dir, tmp_path / "a", **kw)
    prepare(spec, tok_dir / "tokenizer.json", tmp_path / "b", **kw)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "train_000002.bin" in files and not any(f.endswith(".tmp") for f in files)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    index = json.loads((tmp_path / "a" / "index.json").read_text())
    eos = index["eos_id"]
    for split in ("train", "val"):
        shards = index["splits"][split]["shards"]
        assert all(s["tokens"] == 97 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 97
        # a document counts in the shard that holds its eos
        for s in shards:
            stream = np.fromfile(tmp_path / "a" / s["file"], dtype=np.uint16)
            assert s["documents"] == int((stream == eos).sum()) and len(stream) == s["tokens"]

    # the same corpus in one shard reads back identically, windows included
    prepare(spec, tok_dir, tmp_path / "one", **{**kw, "shard_tokens": 10**6})
    np.testing.assert_array_equal(read_split(tmp_path / "a", "train"), read_split(tmp_path / "one", "train"))
    many, one = ShardDataset(tmp_path / "a"), ShardDataset(tmp_path / "one")
    assert many.n_tokens == one.n_tokens and many.n_documents == one.n_documents
    for step in range(3):
        for a, b in zip(many.batch(step, 8, 120, seed=3), one.batch(step, 8, 120, seed=3), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    prepare(spec, tok_dir, tmp_path / "c", **{**kw, "seed": 8})  # another seed, another val set
    assert read_split(tmp_path / "c", "val").tolist() != read_split(tmp_path / "a", "val").tolist()


def test_empty_val_takes_the_last_train_document(tmp_path, tok_dir):
    docs = ["first short document", "second short document", "third document, the longest of the three"]
    spec = write_jsonl(tmp_path / "c.jsonl", docs)
    counts = prepare(spec, tok_dir, tmp_path / "out", val_fraction=0.001, shard_tokens=4, progress=False)
    assert counts["train_documents"] == 2 and counts["val_documents"] == 1
    ref = reference_tokenizer(tok_dir)
    eos = ref.token_to_id("<|eos|>")
    enc = [ref.encode(d).ids + [eos] for d in docs]
    assert read_split(tmp_path / "out", "train").tolist() == enc[0] + enc[1]
    assert read_split(tmp_path / "out", "val").tolist() == enc[2]
    ShardDataset(tmp_path / "out", "train")  # sizes still agree with the index after the move
    ShardDataset(tmp_path / "out", "val")

    counts = prepare(spec, tok_dir, tmp_path / "none", val_fraction=0, progress=False)
    assert counts["val_documents"] == 0 and counts["train_documents"] == 3


def test_uint32_for_a_vocabulary_beyond_uint16(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)} | {"<unk>": 70_000, "</s>": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = tmp_path / "big" / "tokenizer.json"
    tok_path.parent.mkdir()
    tok.save(str(tok_path))
    spec = write_jsonl(tmp_path / "c.jsonl", ["w1 w65535 w69999", "w70 w65536 nope"])
    prepare(spec, tok_path.parent, tmp_path / "out", val_fraction=0, progress=False)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["dtype"] == "uint32" and index["vocab_size"] == 70_002 and index["eos_id"] == 70_001
    assert read_split(tmp_path / "out", "train").tolist() == [1, 65535, 69999, 70001, 70, 65536, 70000, 70001]
    x, y = ShardDataset(tmp_path / "out").batch(0, 2, 3)
    assert x.dtype == torch.long and int(torch.cat([x, y]).max()) <= 70_001

    # a tokenizer object works too, and uint16 is kept while every id fits
    small = Tokenizer(models.WordLevel({"a": 0, "b": 65_534, "</s>": 65_535}, unk_token="a"))
    small.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    prepare(
        write_jsonl(tmp_path / "d.jsonl", ["b a b"]), small, tmp_path / "o16", val_fraction=0, progress=False
    )
    assert json.loads((tmp_path / "o16" / "index.json").read_text())["dtype"] == "uint16"
    assert read_split(tmp_path / "o16", "train").tolist() == [65_534, 0, 65_534, 65_535]


def test_foreign_truncation_padding_and_post_processor_are_ignored(tmp_path):
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "b": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.enable_truncation(max_length=3)  # as BERT-style tokenizer.json files ship
    tok.enable_padding(length=8)
    spec = write_jsonl(tmp_path / "c.jsonl", ["a b a b a", "b"])
    prepare(spec, tok, tmp_path / "out", val_fraction=0, progress=False)
    assert read_split(tmp_path / "out", "train").tolist() == [4, 5, 4, 5, 4, 3, 5, 3]  # [SEP] is eos


@pytest.fixture
def stream_ds(tmp_path, tok_dir) -> tuple[ShardDataset, np.ndarray]:
    prepare(write_jsonl(tmp_path / "c.jsonl", BODY), tok_dir, tmp_path / "s", val_fraction=0, progress=False)
    return ShardDataset(tmp_path / "s"), read_split(tmp_path / "s", "train").astype(np.int64)


def test_random_windows_shape_shift_and_determinism(stream_ds):
    ds, stream = stream_ds
    B, T = 6, 16
    x, y = ds.batch(5, B, T, seed=11)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
    windows = np.lib.stride_tricks.sliding_window_view(stream, T + 1)  # every possible (x, y) row
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        assert (windows == row).all(axis=1).any()  # a contiguous slice of the stream
    torch.testing.assert_close(x[:, 1:], y[:, :-1], rtol=0, atol=0)

    again = ShardDataset(ds.dir).batch(5, B, T, seed=11)  # a fresh reader: no hidden state
    torch.testing.assert_close(again[0], x, rtol=0, atol=0)
    torch.testing.assert_close(again[1], y, rtol=0, atol=0)
    assert not torch.equal(ds.batch(6, B, T, seed=11)[0], x)
    assert not torch.equal(ds.batch(5, B, T, seed=12)[0], x)
    torch.testing.assert_close(ds.batch(5, B, T, seed=11, rows=slice(2, 5))[0], x[2:5], rtol=0, atol=0)


def test_random_windows_reach_the_last_start(stream_ds):
    ds, stream = stream_ds
    T = ds.n_tokens - 2  # exactly two possible windows: starts 0 and 1
    x, _ = ds.batch(0, 64, T, seed=0)
    assert {tuple(r) for r in x.tolist()} == {tuple(stream[0:T].tolist()), tuple(stream[1 : T + 1].tolist())}
    x, y = ds.batch(0, 2, ds.n_tokens - 1)  # one window: the whole stream
    assert x[0].tolist() == stream[:-1].tolist() and y[0].tolist() == stream[1:].tolist()


def test_sequential_windows(stream_ds):
    ds, stream = stream_ds
    T = 10
    n_windows = (len(stream) - 1) // T
    x, y = ds.batch(0, 3, T, mode="sequential")
    assert x.tolist() == [stream[k * T : k * T + T].tolist() for k in range(3)]
    assert y.tolist() == [stream[k * T + 1 : k * T + T + 1].tolist() for k in range(3)]
    x1, _ = ds.batch(1, 3, T, mode="sequential")
    assert x1[0].tolist() == stream[3 * T : 4 * T].tolist()
    xr, _ = ds.batch(1, 3, T, mode="sequential", rows=slice(1, 3))  # a share: those rows only
    torch.testing.assert_close(xr, x1[1:], rtol=0, atol=0)
    step = n_windows // 3 + 1  # wraps around to the start
    xw, _ = ds.batch(step, 3, T, mode="sequential")
    assert xw[-1].tolist() == stream[((step * 3 + 2) % n_windows) * T :][:T].tolist()


def test_eval_batches_cover_consecutive_windows_once(stream_ds):
    ds, stream = stream_ds
    B, T = 4, 12
    n_windows = (len(stream) - 1) // T
    batches = list(ds.eval_batches(B, T))
    assert len(batches) == -(-n_windows // B)
    assert all(x.shape == (B, T) for x, _ in batches[:-1]) and batches[-1][0].shape[0] == n_windows - B * (
        len(batches) - 1
    )
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert xs.tolist() == stream[: n_windows * T].tolist()
    assert ys.tolist() == stream[1 : n_windows * T + 1].tolist()
    assert len(list(ds.eval_batches(B, T, max_batches=2))) == 2
    ranked = list(ds.eval_batches(B, T, rank=1, world_size=2))
    torch.testing.assert_close(ranked[0][0], batches[1][0], rtol=0, atol=0)


def test_progress_bar_reports_throughput(tmp_path, tok_dir, capsys):
    prepare(write_jsonl(tmp_path / "c.jsonl", BODY[:5]), tok_dir, tmp_path / "o", progress=True)
    err = capsys.readouterr().err
    assert "prepare" in err and "B/s" in err


def test_prepare_errors(tmp_path, tok_dir):
    spec = write_jsonl(tmp_path / "c.jsonl", BODY[:3])
    prepare(spec, tok_dir, tmp_path / "done", progress=False)
    with pytest.raises(ZerotuneError, match=r"done: shard folder already exists; pass --overwrite"):
        prepare(spec, tok_dir, tmp_path / "done", progress=False)
    prepare(spec, tok_dir, tmp_path / "done", progress=False, overwrite=True)
    with pytest.raises(ZerotuneError, match=r"val_fraction must be in \[0, 1\)"):
        prepare(spec, tok_dir, tmp_path / "x", val_fraction=1.0)
    with pytest.raises(ZerotuneError, match=r"nowhere: tokenizer file not found"):
        prepare(spec, tmp_path / "nowhere", tmp_path / "x")
    no_eos = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    (tmp_path / "noeos").mkdir()
    no_eos.save(str(tmp_path / "noeos" / "tokenizer.json"))
    with pytest.raises(ZerotuneError, match=r"noeos/tokenizer\.json: the tokenizer has no end-of-text token"):
        prepare(spec, tmp_path / "noeos", tmp_path / "x")
    bad = write_jsonl(tmp_path / "bad.jsonl", ["ok"])
    with open(tmp_path / "bad.jsonl", "a") as f:
        f.write("{oops\n")
    with pytest.raises(ZerotuneError, match=r"bad\.jsonl: line 2: not valid JSON"):
        prepare(bad, tok_dir, tmp_path / "y", progress=False)
    assert not (tmp_path / "y" / "index.json").exists()  # an unfinished folder is never marked done


@pytest.fixture
def prepared(tmp_path, tok_dir) -> Path:
    prepare(
        write_jsonl(tmp_path / "c.jsonl", BODY), tok_dir, tmp_path / "p", val_fraction=0.2, progress=False
    )
    return tmp_path / "p"


def edit_index(folder: Path, change) -> None:
    index = json.loads((folder / "index.json").read_text())
    change(index)
    (folder / "index.json").write_text(json.dumps(index))


def test_truncated_shard_is_an_error_naming_it(prepared):
    shard = prepared / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ZerotuneError, match=r"train_000000\.bin: shard has \d+ bytes but index\.json says"):
        ShardDataset(prepared)
    ShardDataset(prepared, "val")  # the other split is intact


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i: i.update(dtype="float32"), r"field 'dtype' must be one of uint16, uint32"),
        (lambda i: i.pop("vocab_size"), r"field 'vocab_size' must be an integer"),
        (lambda i: i.update(format="other"), r"not a shard index"),
        (lambda i: i["splits"].pop("val"), r"no split 'val' \(have train\)"),
        (
            lambda i: i["splits"]["val"]["shards"][0].update(file="../c.jsonl"),
            r"field 'splits\.val\.shards\[0\]\.file' must be a file name",
        ),
        (
            lambda i: i["splits"]["val"]["shards"][0].update(tokens="many"),
            r"field 'splits\.val\.shards\[0\]\.tokens' must be a positive integer",
        ),
        (lambda i: i["splits"]["val"]["shards"][0].update(tokens=3), r"val_000000\.bin: shard has \d+ bytes"),
        (
            lambda i: i["splits"]["val"]["shards"][0].update(file="val_9.bin"),
            r"val_9\.bin: shard file missing",
        ),
        (lambda i: i.update(eos_id=i["vocab_size"]), r"impossible values: vocab_size \d+ \(1 to 65536 for uint16\), "
                                                      r"eos_id \d+ \(below vocab_size\)"),
        (lambda i: i.update(vocab_size=70_000), r"impossible values: vocab_size 70000 \(1 to 65536 for uint16\)"),
        (lambda i: i.update(vocab_size=0), r"impossible values: vocab_size 0"),
    ],
)
def test_bad_index_is_an_error_naming_it(prepared, change, message):
    edit_index(prepared, change)
    with pytest.raises(ZerotuneError, match=message):
        ShardDataset(prepared, "val")


def test_unreadable_or_missing_index_and_bad_requests(prepared, tmp_path):
    with pytest.raises(ZerotuneError, match=r"no split 'test'"):
        ShardDataset(prepared, "test")
    ds = ShardDataset(prepared)
    with pytest.raises(ZerotuneError, match=r"fewer than block_size \+ 1"):
        ds.batch(0, 2, ds.n_tokens)
    with pytest.raises(ZerotuneError, match=r"unknown batch mode 'shuffle'"):
        ds.batch(0, 2, 8, mode="shuffle")
    (prepared / "index.json").write_text("{not json")
    with pytest.raises(ZerotuneError, match=r"p/index\.json: not valid JSON"):
        ShardDataset(prepared)
    (prepared / "index.json").unlink()
    with pytest.raises(ZerotuneError, match=r"p/index\.json: not found"):
        ShardDataset(prepared)
    with pytest.raises(ZerotuneError, match=r"absent: shard folder not found"):
        ShardDataset(tmp_path / "absent")


def test_a_token_id_outside_the_vocabulary_is_an_error_naming_the_folder(prepared):
    """index.json says how large the vocabulary is; shard files changed behind its back are caught per batch."""
    shard = prepared / "train_000000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[3] = 60_000  # beyond the 320-token vocabulary
    ids.tofile(shard)
    ds = ShardDataset(prepared)
    with pytest.raises(ZerotuneError, match=r"p: the train shards hold token id 60000, outside the vocabulary of 320"):
        list(ds.eval_batches(4, 8))


def test_a_corpus_of_one_long_document_is_split_into_many_at_paragraph_breaks(tmp_path, tok_dir):
    """--split-chars: one document of 40 paragraphs becomes pieces of at most 120 characters that
    end at paragraph breaks; validation then holds many of them, and the pieces are the text."""
    text = "\n\n".join(BODY)
    spec = write_jsonl(tmp_path / "one.jsonl", [text])
    whole = prepare(spec, tok_dir, tmp_path / "whole", val_fraction=0.3, progress=False)
    assert (whole["read"], whole["train_documents"] + whole["val_documents"]) == (1, 1)
    counts = prepare(spec, tok_dir, tmp_path / "split", val_fraction=0.5, split_chars=120, progress=False)
    ref = reference_tokenizer(tok_dir)
    eos = ref.token_to_id("<|eos|>")
    pieces = [ref.decode(d, skip_special_tokens=False) for split in ("train", "val")
              for d in split_docs(read_split(tmp_path / "split", split), eos)]
    assert counts["read"] == len(pieces) == 20 and 5 <= counts["val_documents"] <= 15
    assert all(len(p) <= 120 and (p.endswith("\n\n") or text.endswith(p)) for p in pieces)
    assert sorted(pieces) == sorted(split_document(text, 120))
    assert json.loads((tmp_path / "split" / "index.json").read_text())["split_chars"] == 120


@given(text=st.text(alphabet="ab \n", max_size=300), n=st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_split_document_pieces_join_back_to_the_text(text, n):
    pieces = split_document(text, n)
    assert "".join(pieces) == text and all(1 <= len(p) <= n for p in pieces if text)
    for a, b in zip(pieces, pieces[1:], strict=False):  # packed: the next piece's first paragraph did not fit
        first = b.split("\n\n")[0] + ("\n\n" if "\n\n" in b else "")
        assert len(a) + len(first) > n or len(first) > n or not a.endswith("\n\n")


def test_split_chars_is_bounded(tmp_path, tok_dir):
    with pytest.raises(ZerotuneError, match="split_chars must be a whole number from 1 to 2\\*\\*31, got 0"):
        prepare(write_jsonl(tmp_path / "c.jsonl", BODY), tok_dir, tmp_path / "s", split_chars=0, progress=False)
