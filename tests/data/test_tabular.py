import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from zerotune.config import DataConfig
from zerotune.data.sources import load_source
from zerotune.data.splits import load_data
from zerotune.data.tabular import load_csv, load_jsonl
from zerotune.errors import ZerotuneError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_numeric_csv_integer_labels(tmp_path):
    f = _write(tmp_path / "t.csv", "a,label,b\n1.5,10,2\n-3,2,4e1\n\n0,10,7\n")
    src = load_source(f"csv:{f}")
    torch.testing.assert_close(
        src.train.x, torch.tensor([[1.5, 2.0], [-3.0, 40.0], [0.0, 7.0]]), rtol=0, atol=0
    )
    # integer labels sort numerically: 2 < 10
    assert src.info.classes == ["2", "10"] and src.train.y.tolist() == [1, 0, 1]
    assert src.info.kind == "tabular" and src.info.input_shape == [2] and src.info.target == "classification"


def test_string_labels_and_custom_column(tmp_path):
    f = _write(tmp_path / "t.csv", "x,kind\n1,cat\n2,dog\n3,ant\n")
    src = load_csv(str(f), DataConfig(label_column="kind"))
    assert src.info.classes == ["ant", "cat", "dog"] and src.train.y.tolist() == [1, 2, 0]


def test_float_labels_are_regression(tmp_path):
    f = _write(tmp_path / "t.csv", "x,label\n1,0.5\n2,3\n3,-1.25\n")
    src = load_source(f"csv:{f}")
    assert src.info.target == "regression" and src.train.y.dtype == torch.float32
    torch.testing.assert_close(src.train.y, torch.tensor([0.5, 3.0, -1.25]), rtol=0, atol=0)


def test_text_csv_word_vocabulary(tmp_path):
    f = _write(
        tmp_path / "t.csv", 'text,label\n"Hello, World!",pos\nthe world is big,neg\nHELLO the end,pos\n'
    )
    src = load_csv(str(f), DataConfig(max_length=5))
    tok = src.tokenizer
    assert tok.token_to_id("[PAD]") == 0 and tok.token_to_id("[UNK]") == 1
    assert src.info.kind == "tokens" and src.info.input_shape == [5] and src.info.pad_id == 0
    assert (
        src.info.vocab_size
        == tok.get_vocab_size()
        == 2 + len({"hello", ",", "world", "!", "the", "is", "big", "end"})
    )
    # lowercased, punctuation split off, right-padded with [PAD] = 0
    words = [[tok.id_to_token(i) for i in row if i != 0] for row in src.train.x.tolist()]
    assert words == [["hello", ",", "world", "!"], ["the", "world", "is", "big"], ["hello", "the", "end"]]
    assert src.train.x[0, 4] == 0 and src.train.x.dtype == torch.long
    assert src.info.classes == ["neg", "pos"] and src.train.y.tolist() == [1, 0, 1]


def test_truncation_and_vocab_limit(tmp_path):
    words = [f"w{i}" for i in range(40)]
    rows = "".join(f"{' '.join(words[: i + 1])},{i % 2}\n" for i in range(40))
    f = _write(tmp_path / "t.csv", "text,label\n" + rows)
    src = load_csv(str(f), DataConfig(max_length=8, vocab_size=16))
    assert src.info.vocab_size == 16 and src.train.x.shape == (40, 8)
    # w0 occurs in every row (most frequent) so it is known; w39 occurs once, beyond the 14 kept words
    assert src.tokenizer.token_to_id("w0") is not None and src.tokenizer.token_to_id("w39") is None
    assert src.train.x[39].tolist()[:1] == [src.tokenizer.token_to_id("w0")]
    assert (src.train.x[39] != 0).all()  # 40 words truncated to 8 ids, none padding


def test_jsonl_with_given_tokenizer(tmp_path):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["a tiny corpus for a tiny tokenizer"] * 3,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>"], show_progress=False),
    )
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    lines = [
        {"text": "tiny corpus", "label": "b", "id": 1},
        {"text": "a tokenizer for a tiny corpus", "label": "a", "id": 2},
    ]
    f = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(o) for o in lines) + "\n\n")
    src = load_jsonl(str(f), DataConfig(tokenizer=str(tmp_path / "tok"), max_length=6))
    pad = tok.token_to_id("<pad>")
    assert src.info.pad_id == pad and src.info.vocab_size == tok.get_vocab_size()
    for row, o in zip(src.train.x.tolist(), lines, strict=True):
        ids = tok.encode(o["text"]).ids[:6]
        assert row == ids + [pad] * (6 - len(ids))
    assert src.train.y.tolist() == [1, 0]


def test_jsonl_numeric_and_regression(tmp_path):
    f = _write(tmp_path / "d.jsonl", '{"a": 1, "b": "2.5", "label": 1.5}\n{"a": 0, "b": 3, "label": 2}\n')
    src = load_source(f"jsonl:{f}")
    assert src.info.kind == "tabular" and src.info.target == "regression"
    torch.testing.assert_close(src.train.x, torch.tensor([[1.0, 2.5], [0.0, 3.0]]), rtol=0, atol=0)
    torch.testing.assert_close(src.train.y, torch.tensor([1.5, 2.0]), rtol=0, atol=0)


def test_load_data_through_csv_and_jsonl(tmp_path):
    rows = "".join(f"{i},{i % 3 * 2.0},{'abc'[i % 3]}\n" for i in range(30))
    f = _write(tmp_path / "t.csv", "f1,f2,label\n" + rows)
    data = load_data(DataConfig(train=f"csv:{f}", val_split=0.2, test_split=0.2), seed=0)
    assert len(data.train) == 19 and len(data.val) == 5 and len(data.test) == 6
    assert data.info.classes == ["a", "b", "c"]
    texts = "".join(json.dumps({"text": f"word{i % 4} and more", "label": i % 2}) + "\n" for i in range(20))
    g = _write(tmp_path / "t.jsonl", texts)
    data = load_data(DataConfig(train=f"jsonl:{g}", max_length=4), seed=0)
    assert data.train.x.dtype == torch.long and data.train.x.shape[1] == 4 and data.tokenizer is not None


def test_errors(tmp_path):
    cases = [
        ("", r"e.csv: empty file"),
        ("a,label\n", r"e.csv: no data rows"),
        ("a,b\n1,2\n", r"e.csv: column 'label' not found \(set data.label_column\); columns: a, b"),
        ("a,label\n1,2\nx1,3\n", r"e.csv: line 3, column 'a': 'x1' is not a finite number"),
        ("a,label\n1,2\n3,4,5\n", r"e.csv: line 3: 3 fields, but the header has 2"),
        ("a,label\n1,\n", r"e.csv: line 2, column 'label': empty label"),
        ("label\n1\n", r"e.csv: no feature columns besides 'label'"),
    ]
    for text, message in cases:
        f = _write(tmp_path / "e.csv", text)
        with pytest.raises(ZerotuneError, match=message):
            load_source(f"csv:{f}")
    with pytest.raises(ZerotuneError, match=r"nope.csv: file not found"):
        load_source(f"csv:{tmp_path / 'nope.csv'}")


def test_jsonl_errors(tmp_path):
    cases = [
        ("\n", r"e.jsonl: empty file"),
        ('{"text": "a", "label": 1}\n{"text": "b"\n', r"e.jsonl: line 2: not valid JSON"),
        ('{"text": "a", "label": 1}\n[1, 2]\n', r"e.jsonl: line 2: expected a JSON object, got list"),
        (
            '{"text": "a", "label": 1}\n{"text": "b"}\n',
            r"e.jsonl: line 2: field 'label' missing; fields: text",
        ),
        (
            '{"txt": "a", "y": 1}\n',
            r"e.jsonl: column 'label' not found \(set data.label_column\); columns: txt, y",
        ),
        ('{"text": 5, "label": 1}\n', r"e.jsonl: line 1, column 'text': expected a string"),
    ]
    for text, message in cases:
        f = _write(tmp_path / "e.jsonl", text)
        with pytest.raises(ZerotuneError, match=message):
            load_source(f"jsonl:{f}")


def test_tokenizer_errors(tmp_path):
    f = _write(tmp_path / "t.csv", "text,label\nhi,1\n")
    with pytest.raises(ZerotuneError, match=r"missing: tokenizer file not found"):
        load_csv(str(f), DataConfig(tokenizer=str(tmp_path / "missing")))
    bad = _write(tmp_path / "bad.json", "{not json")
    with pytest.raises(ZerotuneError, match=r"bad.json: not a tokenizer.json \(invalid JSON"):
        load_csv(str(f), DataConfig(tokenizer=str(bad)))
    wrong = _write(tmp_path / "wrong.json", '{"a": 1}')
    with pytest.raises(ZerotuneError, match=r"wrong.json: not a tokenizer.json \(no 'model' section\)"):
        load_csv(str(f), DataConfig(tokenizer=str(wrong)))
    tok = Tokenizer(models.WordLevel({"hi": 0, "<unk>": 1}, unk_token="<unk>"))
    tok.save(str(tmp_path / "nopad.json"))
    with pytest.raises(ZerotuneError, match=r"nopad.json: tokenizer has no padding token"):
        load_csv(str(f), DataConfig(tokenizer=str(tmp_path / "nopad.json")))
