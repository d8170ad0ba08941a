"""Text corpora as a stream of documents, for tokenizer training and token shards.

A text spec is ``KIND:ARG``:

    text:FILE         the file is one document
    text:DIR          every UTF-8 text file under DIR (recursive, sorted by path) is one document;
                      binary or non-UTF-8 files and hidden names (``.git``, ``.cache`` ...) are skipped
    jsonl:FILE        one JSON object per line; the document is its ``text_field`` (default ``text``)
    builtin:pydoc     CPython's bundled documentation topics (``pydoc_data.topics``), sorted by topic
    builtin:stdlib    the standard library's own ``.py`` source files, sorted by path

:func:`split_document` cuts a long document into pieces of bounded length that end at paragraph
breaks, for a corpus of one or a few long documents (``prepare --split-chars``).

Documents are produced one at a time and never collected, so a corpus of any size streams
through in the memory of its largest document. A single text file over ``LARGE_FILE_BYTES``
is a corpus in itself: it is read line by line and cut into documents of about
``PIECE_CHARS`` characters that end at a blank line.
"""

from __future__ import annotations

import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from zerotune.errors import ZerotuneError
from zerotune.files import iter_jsonl

TEXT_KINDS = ("text", "jsonl", "builtin")
TEXT_BUILTINS = ("pydoc", "stdlib")
LARGE_FILE_BYTES = 64 * 2**20
PIECE_CHARS = 2**20  # a large file's documents end at the first blank line past this many characters
MAX_PIECE_CHARS = 16 * 2**20  # ... or at a line end past this many, when blank lines are rare
_SNIFF_BYTES = 8192


def iter_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """Stream the documents of a text spec (see the module docstring).

    The spec is checked at once (unknown kind, missing file); problems inside a file
    (a bad JSON line, a missing field) are raised while iterating.

    Args:
        spec: ``text:FILE|DIR``, ``jsonl:FILE``, ``builtin:pydoc`` or ``builtin:stdlib``.
        text_field: the field holding the text in each ``jsonl`` object.

    Returns:
        An iterator of documents (str).

    Raises:
        ZerotuneError: unknown kind, missing file or folder, unreadable content.

    Example:
        >>> n = sum(1 for _ in iter_documents("builtin:pydoc"))
    """
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in TEXT_KINDS:
        raise ZerotuneError(
            f"text spec {spec!r}: expected KIND:ARG with KIND one of {', '.join(TEXT_KINDS)} "
            "(text:FILE|DIR, jsonl:FILE, builtin:pydoc, builtin:stdlib)"
        )
    if kind == "builtin":
        if arg == "pydoc":
            return _pydoc_documents()
        if arg == "stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            return _file_documents(_stdlib_files(root), skip_unreadable=True)
        raise ZerotuneError(
            f"text spec {spec!r}: unknown builtin text {arg!r}; choose from {', '.join(TEXT_BUILTINS)}"
        )
    path = Path(arg)
    if kind == "jsonl":
        if not path.is_file():
            raise ZerotuneError("file not found", path=path)
        return _jsonl_documents(path, text_field)
    if path.is_dir():
        return _file_documents(_text_files(path), skip_unreadable=True)
    if path.is_file():
        return _file_documents(iter([path]), skip_unreadable=False)
    raise ZerotuneError("file or folder not found", path=path)


def _pydoc_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _walk_sorted(root: Path, skip_dir) -> list[Path]:
    """All files under ``root`` (not following links to folders), sorted by their path below root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skip_dir(d)]
        found.extend(Path(dirpath, f) for f in filenames)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _text_files(root: Path) -> Iterator[Path]:
    for path in _walk_sorted(root, lambda d: d.startswith(".")):
        if not path.name.startswith(".") and path.is_file():
            yield path


def _stdlib_files(root: Path) -> Iterator[Path]:
    skip = {"site-packages", "dist-packages", "__pycache__"}
    for path in _walk_sorted(root, lambda d: d in skip or d.startswith(".")):
        if path.suffix == ".py" and path.is_file():
            yield path


def _file_documents(paths: Iterator[Path], skip_unreadable: bool) -> Iterator[str]:
    """One document per UTF-8 text file; binary and non-UTF-8 files are skipped or rejected."""
    for path in paths:
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(_SNIFF_BYTES)
                if b"\x00" in head:  # NUL bytes never occur in text, always in binary formats
                    if skip_unreadable:
                        continue
                    raise ZerotuneError("binary file, expected UTF-8 text", path=path)
                if size > LARGE_FILE_BYTES:
                    f.seek(0)
                    yield from _large_file_pieces(f, path)
                    continue
                data = head + f.read()
        except OSError as e:
            raise ZerotuneError(f"cannot read ({e.strerror})", path=path) from None
        try:
            yield data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            if not skip_unreadable:
                raise ZerotuneError(f"not UTF-8 text (byte {e.start}: {e.reason})", path=path) from None


def _large_file_pieces(f, path: Path) -> Iterator[str]:
    """Cut a large text file into documents that end at a blank line (bounded memory)."""
    lines: list[str] = []
    n_chars = 0
    for n, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ZerotuneError(f"line {n}: not UTF-8 text ({e.reason})", path=path) from None
        lines.append(line)
        n_chars += len(line)
        if (n_chars >= PIECE_CHARS and not line.strip()) or n_chars >= MAX_PIECE_CHARS:
            yield "".join(lines)
            lines, n_chars = [], 0
    if lines:
        yield "".join(lines)


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for n, obj in iter_jsonl(path):
        if field not in obj:
            raise ZerotuneError(
                f"line {n}: no field {field!r} (fields: {', '.join(map(str, obj)) or 'none'})", path=path
            )
        text = obj[field]
        if not isinstance(text, str):
            raise ZerotuneError(
                f"line {n}: field {field!r} is {type(text).__name__}, expected a string", path=path
            )
        try:  # a \u escape can smuggle in a lone surrogate that no encoder accepts
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ZerotuneError(
                f"line {n}: field {field!r} holds an unpaired surrogate escape", path=path
            ) from None
        yield text


def split_document(text: str, max_chars: int) -> list[str]:
    """``text`` cut into pieces of at most ``max_chars`` characters: paragraphs (ending at a blank
    line) are packed together while they fit; a longer paragraph is cut at line ends, a longer
    line every ``max_chars`` characters. Joined back, the pieces are ``text``.

    Example:
        >>> split_document("one\n\ntwo\n\nthree", 8)
        ['one\n\n', 'two\n\n', 'three']
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    if len(text) <= max_chars:
        return [text]
    units: list[str] = []
    for paragraph in re.split(r"(?<=\n\n)", text):
        if len(paragraph) <= max_chars:
            units.append(paragraph)
            continue
        for line in paragraph.splitlines(keepends=True):
            units += [line[i : i + max_chars] for i in range(0, len(line), max_chars)]
    pieces, current = [], ""
    for unit in units:
        if current and len(current) + len(unit) > max_chars:
            pieces.append(current)
            current = ""
        current += unit
    return pieces + [current] if current else pieces
