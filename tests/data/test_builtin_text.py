"""builtin:stdlib_topics: 13-topic text classification from the standard library's docstrings."""

from __future__ import annotations

import torch

from zerotune.config import DataConfig
from zerotune.data.builtin import STDLIB_TOPICS, docstring_texts
from zerotune.data.sources import load_source


def test_stdlib_topics_is_a_large_balanced_text_set():
    src = load_source("builtin:stdlib_topics", DataConfig(max_length=32))
    assert src.info.kind == "tokens" and src.info.classes == sorted(STDLIB_TOPICS) and len(src.info.classes) == 13
    assert src.train.x.shape == (len(src.train), 32) and len(src.train) >= 2000
    assert torch.bincount(src.train.y, minlength=13).min() >= 100  # every topic well represented
    texts = [text for text, _ in docstring_texts(STDLIB_TOPICS)]
    assert len(texts) == len(src.train) and len(set(texts)) == len(texts)  # no text twice
    assert src.tokenizer.decode(src.train.x[0].tolist()).strip()  # real text, not padding


def test_stdlib_topics_loads_the_same_twice():
    a = load_source("builtin:stdlib_topics", DataConfig(max_length=16))
    b = load_source("builtin:stdlib_topics", DataConfig(max_length=16))
    assert a.info.classes == b.info.classes
    torch.testing.assert_close(a.train.x, b.train.x, rtol=0, atol=0)
    torch.testing.assert_close(a.train.y, b.train.y, rtol=0, atol=0)


def test_the_texts_do_not_depend_on_what_this_process_patched(monkeypatch):
    """A command line's own warning format, or a library's extra logger methods, change no example."""
    import logging
    import warnings

    def warning_once(self, msg):
        """Like logger.warning(), but each message only once per process."""

    before = docstring_texts(STDLIB_TOPICS)
    monkeypatch.setattr(warnings, "formatwarning", lambda msg, *a, **k: f"warning: {msg}\n")
    monkeypatch.setattr(logging.Logger, "warning_once", warning_once, raising=False)
    assert docstring_texts(STDLIB_TOPICS) == before
