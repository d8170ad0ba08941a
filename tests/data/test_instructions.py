import json
from pydoc_data.topics import topics

import pytest

from zerotune.data.instructions import MAX_OUTPUT_CHARS, make_pydoc_instructions, pydoc_instructions
from zerotune.errors import ZerotuneError


def test_deterministic_jsonl(tmp_path):
    a = make_pydoc_instructions(tmp_path / "a.jsonl")
    b = make_pydoc_instructions(tmp_path / "sub" / "b.jsonl")
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    assert rows == pydoc_instructions()
    assert len(rows) == len(topics)  # every topic has some prose
    keys = [r["instruction"].split('"')[1] for r in rows]
    assert keys == sorted(topics)


def test_first_n_and_content():
    rows = pydoc_instructions(5)
    assert [r["instruction"] for r in rows] == [f'Explain the Python topic "{k}".' for k in sorted(topics)[:5]]
    for row, key in zip(rows, sorted(topics), strict=False):
        assert set(row) == {"instruction", "input", "output"} and row["input"] == ""
        assert 0 < len(row["output"]) <= MAX_OUTPUT_CHARS + 4
        # the answer's first sentence is prose of that topic (wrapped lines joined by spaces)
        first_words = row["output"].split()[:6]
        assert " ".join(first_words) in " ".join(topics[key].split())


def test_paragraph_rules():
    from zerotune.data import instructions as I

    text = ("The \"x\" statement\n******************\n\nFirst line of prose\ncontinues here:\n\n"
            "   x_stmt ::= \"x\"\n\nHeading\n=======\n\nAdded in version 3.5.\n\nSecond paragraph.\n")
    assert I._paragraphs(text) == ["First line of prose continues here:", "Second paragraph."]
    assert I._answer(text) == "First line of prose continues here.\n\nSecond paragraph."


def test_bad_n():
    with pytest.raises(ZerotuneError, match="n: expected at least 1, got 0"):
        pydoc_instructions(0)
