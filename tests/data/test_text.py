"""Text specs stream the documents we expect, in a fixed order, with clear errors."""

from __future__ import annotations

import itertools
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from zerotune.data import text
from zerotune.data.text import iter_documents
from zerotune.errors import ZerotuneError


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_bytes(data.encode("utf-8"))
    return path


def test_text_dir_recursive_sorted_skips_binary_hidden_and_non_utf8(tmp_path):
    root = tmp_path / "corpus"
    write(root / "b.txt", "second\r\nwith CRLF kept\n")
    write(root / "a.md", "first: café ☕\n")
    write(root / "sub" / "c.txt", "third\n")
    write(root / "sub" / "deeper" / "d.py", "print('fourth')\n")
    write(root / "aa" / "z.txt", "between a.md and b.txt\n")
    write(root / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(root / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(root / ".hidden.txt", "hidden\n")
    write(root / ".git" / "HEAD", "ref: refs/heads/main\n")
    write(root / "empty.txt", "")
    write(root / "bom.txt", "\ufeffwith a byte order mark")

    docs = list(iter_documents(f"text:{root}"))

    assert docs == [
        "first: café ☕\n",
        "between a.md and b.txt\n",
        "second\r\nwith CRLF kept\n",
        "with a byte order mark",
        "",
        "third\n",
        "print('fourth')\n",
    ]


def test_text_file_is_one_document(tmp_path):
    path = write(tmp_path / "one.txt", "line one\n\nline two\n")
    assert list(iter_documents(f"text:{path}")) == ["line one\n\nline two\n"]


def test_text_file_binary_or_not_utf8_is_an_error_naming_it(tmp_path):
    binary = write(tmp_path / "data.bin", b"abc\x00def")
    with pytest.raises(ZerotuneError, match=r"data\.bin: binary file"):
        list(iter_documents(f"text:{binary}"))
    latin = write(tmp_path / "latin.txt", "na\xefve".encode("latin-1"))
    with pytest.raises(ZerotuneError, match=r"latin\.txt: not UTF-8 text \(byte 2"):
        list(iter_documents(f"text:{latin}"))


def test_large_text_file_is_cut_at_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "LARGE_FILE_BYTES", 100)
    monkeypatch.setattr(text, "PIECE_CHARS", 40)
    monkeypatch.setattr(text, "MAX_PIECE_CHARS", 1000)
    paragraphs = [f"paragraph {i} " + "word " * (i % 7) + "\nsecond line\n" for i in range(20)]
    content = "\n".join(paragraphs)
    path = write(tmp_path / "big.txt", content)

    pieces = list(iter_documents(f"text:{path}"))

    assert "".join(pieces) == content
    assert len(pieces) > 3
    for piece in pieces[:-1]:
        assert len(piece) >= 40
        assert piece.endswith("\n\n")  # ends at a blank line


def test_jsonl_field_and_blank_lines(tmp_path):
    rows = [{"body": "first doc", "id": 1}, {"body": "zweites Dokument\nmit Zeile", "id": 2}]
    lines = [json.dumps(r) for r in rows]
    path = write(tmp_path / "docs.jsonl", lines[0] + "\n\n" + lines[1] + "\n")
    assert list(iter_documents(f"jsonl:{path}", text_field="body")) == [r["body"] for r in rows]


@pytest.mark.parametrize(
    ("third_line", "message"),
    [
        ('{"text": "unterminated', r"line 3: not valid JSON"),
        ('["a", "list"]', r"line 3: expected a JSON object, got list"),
        ('{"body": "x"}', r"line 3: no field 'text' \(fields: body\)"),
        ('{"text": 42}', r"line 3: field 'text' is int, expected a string"),
        ('{"text": "half \\ud800 pair"}', r"line 3: field 'text' holds an unpaired surrogate"),
    ],
)
def test_jsonl_bad_line_is_an_error_naming_file_and_line(tmp_path, third_line, message):
    path = write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": "b"}\n' + third_line + "\n")
    docs = iter_documents(f"jsonl:{path}")
    assert next(docs) == "a"  # streamed: the bad line is reached only when read
    assert next(docs) == "b"
    with pytest.raises(ZerotuneError, match=r"bad\.jsonl: " + message):
        next(docs)


def test_jsonl_not_utf8_line(tmp_path):
    path = write(tmp_path / "enc.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ZerotuneError, match=r"enc\.jsonl: line 2: not UTF-8"):
        list(iter_documents(f"jsonl:{path}"))


def test_builtin_pydoc_sorted_by_topic():
    from pydoc_data.topics import topics

    docs = iter_documents("builtin:pydoc")
    assert isinstance(docs, Iterator)
    assert list(docs) == [topics[k] for k in sorted(topics)]


def test_builtin_stdlib_reads_sorted_sources_without_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = list(text._stdlib_files(root))
    rel = [p.relative_to(root).parts for p in paths]
    assert len(paths) > 500
    assert rel == sorted(rel)
    assert all(p.suffix == ".py" for p in paths)
    assert not any(part in ("site-packages", "dist-packages") for parts in rel for part in parts)
    assert ("os.py",) in rel and ("json", "__init__.py") in rel

    first = list(itertools.islice(iter_documents("builtin:stdlib"), 3))
    readable = [p for p in paths if _utf8(p)][:3]
    assert first == [p.read_text(encoding="utf-8-sig") for p in readable]


def _utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("corpus.txt", r"expected KIND:ARG with KIND one of text, jsonl, builtin"),
        ("csv:x.csv", r"expected KIND:ARG"),
        ("builtin:wiki", r"unknown builtin text 'wiki'; choose from pydoc, stdlib"),
        ("text:{tmp}/missing", r"missing: file or folder not found"),
        ("jsonl:{tmp}/missing.jsonl", r"missing\.jsonl: file not found"),
    ],
)
def test_bad_spec_fails_at_once(tmp_path, spec, message):
    with pytest.raises(ZerotuneError, match=message):
        iter_documents(spec.format(tmp=tmp_path))  # not iterated: checked when called
