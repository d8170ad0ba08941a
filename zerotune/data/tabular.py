"""``csv:FILE`` and ``jsonl:FILE``: supervised examples from a table.

Two shapes of table are understood:

* numeric features + a label column (``data.label_column``, default ``label``): every other
  column is a feature → kind ``tabular``, x float32 (N, F);
* a text column (``data.text_column``, default ``text``) + a label column → kind ``tokens``,
  x int64 (N, ``data.max_length``) token ids, right-padded with the pad id and truncated.

A CSV file has a header row; a JSONL file has one JSON object per line.

Labels: integers or strings → classification, ``classes`` = the sorted distinct labels as
strings (integers sorted numerically), y = index into ``classes``; any non-integer number →
regression, y float32.

Text is tokenised with ``data.tokenizer`` (a ``tokenizer.json`` file or a folder holding one)
when set; otherwise a word-level vocabulary of at most ``data.vocab_size`` entries is built on
the file's own texts (NFKC + lowercase, split on whitespace and punctuation, ``[PAD]`` = 0,
``[UNK]`` = 1). The tokenizer is returned in ``Source.tokenizer``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from zerotune.config import DataConfig
from zerotune.data.base import Source, Split
from zerotune.data.tokenizer import load_tokenizer
from zerotune.errors import ZerotuneError
from zerotune.files import iter_jsonl
from zerotune.spec import DataInfo

PAD, UNK = "[PAD]", "[UNK]"
PAD_CANDIDATES = (PAD, "<pad>", "<|pad|>", "<|padding|>", "</s>", "<|endoftext|>")


# ---------------------------------------------------------------- tokenizers


def build_word_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A word-level tokenizer trained on ``texts``: the ``vocab_size - 2`` most frequent words
    plus ``[PAD]`` (id 0) and ``[UNK]`` (id 1)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def pad_id_of(tok: Tokenizer, path: object = None) -> int:
    """The tokenizer's padding id: its padding setting, else the first of the usual pad tokens."""
    if tok.padding is not None:
        return int(tok.padding["pad_id"])
    for token in PAD_CANDIDATES:
        found = tok.token_to_id(token)
        if found is not None:
            return int(found)
    raise ZerotuneError(f"tokenizer has no padding token (looked for {', '.join(PAD_CANDIDATES)})", path=path)


def encode_texts(tok: Tokenizer, texts: list[str], max_length: int, pad_id: int) -> torch.Tensor:
    """Encode ``texts`` to int64 (N, max_length) ids, truncated and right-padded with ``pad_id``."""
    tok.no_truncation()
    tok.no_padding()
    out = np.full((len(texts), max_length), pad_id, dtype=np.int64)  # (N, T)
    for i, enc in enumerate(tok.encode_batch(texts)):
        ids = enc.ids[:max_length]
        out[i, : len(ids)] = ids
    return torch.from_numpy(out)


# ---------------------------------------------------------------- reading tables


def read_csv(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows and each row's line number; empty files and ragged rows are errors."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows, lines = [], []
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != len(header):
                    raise ZerotuneError(
                        f"line {reader.line_num}: {len(row)} fields, but the header has {len(header)}",
                        path=path,
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise ZerotuneError("not a UTF-8 text file", path=path) from None
    except csv.Error as e:
        raise ZerotuneError(f"malformed CSV ({e})", path=path) from None
    if header is None:
        raise ZerotuneError("empty file: expected a header row and data rows", path=path)
    header = [h.strip() for h in header]
    if not rows:
        raise ZerotuneError("no data rows after the header", path=path)
    return header, rows, lines


def read_jsonl(path: Path) -> tuple[list[str], list[list[object]], list[int]]:
    """Field names (the first object's keys), rows of values, and line numbers."""
    header: list[str] | None = None
    rows, lines = [], []
    for number, obj in iter_jsonl(path):
        if header is None:
            header = list(obj)
        missing = [k for k in header if k not in obj]
        if missing:
            raise ZerotuneError(
                f"line {number}: field {missing[0]!r} missing; fields: {', '.join(obj) or '(none)'}",
                path=path,
            )
        rows.append([obj[k] for k in header])
        lines.append(number)
    if header is None:
        raise ZerotuneError("empty file: expected one JSON object per line", path=path)
    return header, rows, lines


def _column(header: list[str], name: str, option: str, path: Path) -> int:
    if name not in header:
        raise ZerotuneError(
            f"column {name!r} not found (set data.{option}); columns: {', '.join(header)}", path=path
        )
    return header.index(name)


def _number(value: object) -> float | None:
    """A finite number from a number or numeric string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return out if math.isfinite(out) else None


def parse_labels(
    values: list[object], lines: list[int], column: str, path: Path
) -> tuple[torch.Tensor, list[str], str]:
    """Labels → (y, classes, target) as described in the module docstring."""
    parsed: list[int | float | str] = []
    for value, line in zip(values, lines, strict=True):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ZerotuneError(f"line {line}, column {column!r}: empty label", path=path)
        if isinstance(value, bool):
            parsed.append(str(value).lower())
        elif isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ZerotuneError(f"line {line}, column {column!r}: label {value} is not finite", path=path)
            parsed.append(value)
        elif isinstance(value, str):
            s = value.strip()
            try:
                parsed.append(int(s))
            except ValueError:
                number = _number(s)
                parsed.append(number if number is not None else s)
        else:
            raise ZerotuneError(
                f"line {line}, column {column!r}: label must be a string or number", path=path
            )
    if all(isinstance(v, int) for v in parsed):
        labels = sorted(set(parsed))
        index = {v: i for i, v in enumerate(labels)}
        y = torch.tensor([index[v] for v in parsed], dtype=torch.long)
        return y, [str(v) for v in labels], "classification"
    if all(isinstance(v, (int, float)) for v in parsed):
        return torch.tensor(parsed, dtype=torch.float32), [], "regression"
    # strings (or strings mixed with numbers): classes by their text
    texts = [v.strip() if isinstance(v, str) else str(v) for v in values]
    labels = sorted(set(texts))
    index = {v: i for i, v in enumerate(labels)}
    return torch.tensor([index[v] for v in texts], dtype=torch.long), labels, "classification"


def table_source(
    header: list[str], rows: list[list[object]], lines: list[int], path: Path, cfg: DataConfig | None = None
) -> Source:
    """Turn a parsed table into a Source (numeric features or text, see the module docstring)."""
    cfg = cfg or DataConfig()
    if cfg.label_column is None:  # inputs only (e.g. for predict): no labels to read
        label, y, classes, target = None, torch.zeros(len(rows), dtype=torch.long), [], "classification"
    else:
        label = _column(header, cfg.label_column, "label_column", path)
        y, classes, target = parse_labels([r[label] for r in rows], lines, cfg.label_column, path)
    if cfg.text_column in header:
        text = header.index(cfg.text_column)
        texts = []
        for row, line in zip(rows, lines, strict=True):
            if not isinstance(row[text], str):
                raise ZerotuneError(f"line {line}, column {cfg.text_column!r}: expected a string", path=path)
            texts.append(row[text])
        if cfg.tokenizer:
            tok = load_tokenizer(cfg.tokenizer)
            pad_id = pad_id_of(tok, cfg.tokenizer)
        else:
            tok = build_word_tokenizer(texts, cfg.vocab_size)
            pad_id = tok.token_to_id(PAD)
        x = encode_texts(tok, texts, cfg.max_length, pad_id)  # (N, T)
        info = DataInfo(
            "tokens",
            [cfg.max_length],
            target=target,
            classes=classes,
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
            pad_id=pad_id,
        )
        return Source(Split(x, y), info, tokenizer=tok)
    features = [i for i in range(len(header)) if i != label]
    if not features:
        raise ZerotuneError(
            f"no feature columns besides {cfg.label_column!r} and no {cfg.text_column!r} column "
            "(set data.text_column for text)",
            path=path,
        )
    x = np.empty((len(rows), len(features)), dtype=np.float32)  # (N, F)
    for r, (row, line) in enumerate(zip(rows, lines, strict=True)):
        for c, i in enumerate(features):
            number = _number(row[i])
            if number is None:
                raise ZerotuneError(
                    f"line {line}, column {header[i]!r}: {row[i]!r} is not a finite number", path=path
                )
            x[r, c] = number
    info = DataInfo("tabular", [len(features)], target=target, classes=classes)
    return Source(Split(torch.from_numpy(x), y), info)


def _file(arg: str) -> Path:
    path = Path(arg)
    if not path.is_file():
        raise ZerotuneError("file not found" if not path.exists() else "not a file", path=path)
    return path


def load_csv(arg: str, cfg: DataConfig | None = None) -> Source:
    """``csv:FILE`` with a header row: numeric features + label, or text + label."""
    path = _file(arg)
    header, rows, lines = read_csv(path)
    return table_source(header, rows, lines, path, cfg)


def load_jsonl(arg: str, cfg: DataConfig | None = None) -> Source:
    """``jsonl:FILE`` with one object per line: text + label fields (or numeric fields + label)."""
    path = _file(arg)
    header, rows, lines = read_jsonl(path)
    return table_source(header, rows, lines, path, cfg)
