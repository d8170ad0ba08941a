"""A small instruction set derived offline from CPython's bundled documentation.

``pydoc_data.topics.topics`` maps topic names (``assert``, ``class``, ``for`` ...) to the text
of a section of the language reference. Each topic becomes one instruction row:

    {"instruction": "Explain the Python topic \\"assert\\".",
     "input": "",
     "output": <the section's opening prose, up to MAX_OUTPUT_CHARS>}

The output is the section's first prose paragraph, followed by the next ones while the
answer stays under ``MIN_OUTPUT_CHARS``. Indented blocks (grammar, code), headings, version
notes and later paragraphs that only introduce a skipped block (ending in ":") are left out;
a first paragraph ending in ":" ends in "." instead. Wrapped lines are joined by single spaces.
Topics are taken in sorted order, so the set depends only on the Python version that ships the topics, never on chance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zerotune.data.chat import ROLES
from zerotune.errors import ZerotuneError
from zerotune.files import iter_jsonl, write_text

BUILTIN_INSTRUCTIONS = "builtin:pydoc_instructions"

MIN_OUTPUT_CHARS = 200  # keep adding paragraphs until the answer is at least this long ...
MAX_OUTPUT_CHARS = 600  # ... and cut it (at a word) when it grows past this
VERSION_NOTES = ("New in version", "Added in version", "Changed in version", "Deprecated since version")


def _is_rule(line: str) -> bool:
    """A reStructuredText underline such as ``*****`` or ``=====``."""
    s = line.strip()
    return len(s) >= 3 and len(set(s)) == 1 and s[0] in "*=-~^#"


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a topic: title and rules dropped, indented blocks skipped, lines joined."""
    out: list[str] = []
    current: list[str] = []
    lines = text.splitlines()
    # the first two lines are the title and its underline
    if len(lines) >= 2 and _is_rule(lines[1]):
        lines = lines[2:]
    for line in lines + [""]:
        if _is_rule(line):  # the lines above were a section heading, not prose
            current = []
            continue
        if not line.strip() or line[0].isspace():
            if current:
                out.append(" ".join(current))
                current = []
            continue
        current.append(line.strip())
    return [p for p in out if not p.startswith(VERSION_NOTES)]


def _answer(text: str) -> str:
    answer = ""
    for i, paragraph in enumerate(_paragraphs(text)):
        if paragraph.endswith(":"):  # it introduces a grammar or code block that is skipped
            if i:
                continue
            paragraph = paragraph[:-1] + "."
        answer = f"{answer}\n\n{paragraph}" if answer else paragraph
        if len(answer) >= MIN_OUTPUT_CHARS:
            break
    if len(answer) > MAX_OUTPUT_CHARS:
        answer = answer[:MAX_OUTPUT_CHARS].rsplit(" ", 1)[0] + " ..."
    return answer


def pydoc_instructions(n: int | None = None) -> list[dict[str, str]]:
    """The instruction rows (see the module docstring), the first ``n`` topics in sorted order.

    Raises:
        ZerotuneError: ``n`` below 1.
    """
    from pydoc_data.topics import topics

    if n is not None and n < 1:
        raise ZerotuneError(f"n: expected at least 1, got {n}")
    rows = []
    for key in sorted(topics):
        answer = _answer(topics[key])
        if answer:
            rows.append({"instruction": f'Explain the Python topic "{key}".', "input": "", "output": answer})
        if n is not None and len(rows) == n:
            break
    return rows


def make_pydoc_instructions(out_path: str | Path, n: int | None = None) -> Path:
    """Write :func:`pydoc_instructions` as JSONL (one row per line, UTF-8) to ``out_path``, atomically.

    Returns:
        The path written.

    Example:
        >>> make_pydoc_instructions("data/pydoc_instructions.jsonl", n=20)
    """
    path = Path(out_path)
    rows = pydoc_instructions(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- rows → messages


def messages_from_row(row: Any, where: str = "row") -> list[dict[str, str]]:
    """One JSONL row (instruction triple or ``messages``) → a list of {role, content}.

    Raises:
        ZerotuneError: a row that is neither form, an unknown role, a non-string field,
            or a chat without an assistant message; ``where`` names the file and line.
    """
    if not isinstance(row, dict):
        raise ZerotuneError(f"expected a JSON object, got {type(row).__name__}", path=where)
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ZerotuneError("messages: expected a non-empty list of {role, content}", path=where)
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
                raise ZerotuneError(f"messages[{i}]: expected an object with role and content", path=where)
            if m["role"] not in ROLES:
                raise ZerotuneError(f"messages[{i}].role: {m['role']!r} is not one of {', '.join(ROLES)}",
                                    path=where)
            if not isinstance(m["content"], str):
                raise ZerotuneError(f"messages[{i}].content: expected a string", path=where)
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise ZerotuneError("messages: no assistant message to learn from", path=where)
        return out
    for key in ("instruction", "output"):
        if key not in row:
            raise ZerotuneError(f"{key}: required key is missing (a row needs instruction/output or messages)",
                                path=where)
    for key in ("instruction", "input", "output", "system"):
        if key in row and not isinstance(row[key], str):
            raise ZerotuneError(f"{key}: expected a string, got {type(row[key]).__name__}", path=where)
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    out = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return out + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def load_instructions(spec: str) -> list[list[dict[str, str]]]:
    """The chats of an instruction data spec: ``jsonl:FILE``, a ``.jsonl`` path, or ``builtin:pydoc_instructions``.

    Raises:
        ZerotuneError: missing file, invalid JSON line or bad row (file and line named), empty file.
    """
    if spec == BUILTIN_INSTRUCTIONS:
        return [messages_from_row(r, BUILTIN_INSTRUCTIONS) for r in pydoc_instructions()]
    kind, sep, arg = spec.partition(":")
    if sep and kind == "builtin":
        raise ZerotuneError(f"data spec {spec!r}: unknown builtin instruction set; use {BUILTIN_INSTRUCTIONS}")
    path = Path(arg if sep and kind == "jsonl" else spec)
    chats = [messages_from_row(row, f"{path}: line {n}") for n, row in iter_jsonl(path)]
    if not chats:
        raise ZerotuneError("no instruction rows", path=path)
    return chats
