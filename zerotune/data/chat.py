"""Chat data for instruction tuning: the chat template, token ids with answer labels, packing.

Chat template (:class:`zerotune.config.ChatTemplate`, saved with the model as
``RUN/chat_template.json``). Each message is rendered as

    MARKER(role) · encode(content) · END

with the default markers ``<|system|> <|user|> <|assistant|> <|end|>``, the reserved tokens of
every zerotune tokenizer, so a two-turn chat is the token sequence

    <|system|> You are terse. <|end|> <|user|> Hi <|end|> <|assistant|> Hello <|end|>

(no text is added between markers and content). A marker that is a single token of the
vocabulary is inserted by id; any other marker string is encoded as text. Content is encoded
with special-token matching off, so a literal ``<|end|>`` inside a message is plain text and
can never end a turn. A generation prompt is the rendered history followed by the assistant
marker (:func:`chat_prompt_ids`); generation stops at the end marker.

Labels. For the token sequence s₁…s_n the model input is x = s₁…s_{n−1} and the target is
y_t = s_{t+1} where s_{t+1} is an answer token — the content of an assistant message or the
end marker closing it — and −100 (ignored) everywhere else (:func:`example_pair`).

Truncation keeps the first ``max_length`` positions of x (and y); an example left with no
answer token is dropped (counted in :class:`SFTData`).

Packing (``sft.packing: true``, :func:`pack_pairs`) fills each row with whole examples, (x, y)
pairs concatenated back to back, while they fit in ``max_length`` positions, then pads. No
target crosses an example: the last target of one example is its own end marker, and the first
position of the next example is a role marker that is never a target. Attention is NOT confined
to an example: the model runs one causal attention over the whole row, so a later example can
attend to the earlier ones in its row (positions also run on across the row). The loss still
counts only each example's own answer tokens. Unpacked rows hold one example each, right-padded
with the pad id (padding is never a target, and under causal attention it cannot influence the
real positions before it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from zerotune.config import ChatTemplate, describe_error
from zerotune.errors import ZerotuneError
from zerotune.files import read_json_object, write_text

IGNORE = -100
ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.json"


# ---------------------------------------------------------------- template I/O


def save_chat_template(template: ChatTemplate, path: str | Path) -> Path:
    """Write the template as JSON to ``path`` (a file, or a folder that gets ``chat_template.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / TEMPLATE_FILE
    write_text(path, template.model_dump_json(indent=1) + "\n")
    return path


def load_chat_template(path: str | Path) -> ChatTemplate:
    """Read a template written by :func:`save_chat_template` (a file, or a folder holding one).

    Raises:
        ZerotuneError: missing file, invalid JSON or unknown keys (named).
    """
    path = Path(path)
    if path.is_dir():
        path = path / TEMPLATE_FILE
    try:
        return ChatTemplate.model_validate(read_json_object(path))
    except ValidationError as e:
        raise ZerotuneError(describe_error(e.errors()[0]), path=path) from None


def jinja_template(template: ChatTemplate) -> str:
    """The template as a Hugging Face ``chat_template`` (Jinja), for ``tokenizer_config.json``: with it,
    ``transformers``' ``apply_chat_template`` renders a chat as :func:`encode_chat` encodes it."""
    q = json.dumps  # a JSON string is a Jinja string literal
    system = (f"{{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}}"
              f"{{{{ {q(template.system + template.default_system + template.end)} }}}}{{%- endif -%}}"
              if template.default_system is not None else "")
    markers = ", ".join(f"{q(role)}: {q(template.marker(role))}" for role in ROLES)
    return (f"{{%- set markers = {{{markers}}} -%}}{system}"
            f"{{%- for message in messages -%}}{{{{ markers[message['role']] + message['content'] + "
            f"{q(template.end)} }}}}{{%- endfor -%}}"
            f"{{%- if add_generation_prompt -%}}{{{{ {q(template.assistant)} }}}}{{%- endif -%}}")


# ---------------------------------------------------------------- messages ↔ token ids


def _marker_ids(tokenizer, marker: str) -> list[int]:
    tid = tokenizer.token_to_id(marker)
    return [tid] if tid is not None else tokenizer.encode(marker, add_special_tokens=False).ids


def _content_ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    before = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # a literal "<|end|>" in the data is text, not a control token
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = before


def _with_default_system(messages: list[dict[str, str]], template: ChatTemplate) -> list[dict[str, str]]:
    if template.default_system is not None and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": template.default_system}, *messages]
    return messages


def encode_chat(messages: list[dict[str, str]], tokenizer, template: ChatTemplate) -> tuple[list[int], list[bool]]:
    """Token ids of a chat and, per token, whether it is an answer token (assistant content + its end).

    Example:
        >>> ids, answer = encode_chat([{"role": "user", "content": "Hi"},
        ...                            {"role": "assistant", "content": "Hello"}], tok, ChatTemplate())
    """
    ids: list[int] = []
    answer: list[bool] = []
    end = _marker_ids(tokenizer, template.end)
    for m in _with_default_system(messages, template):
        head = _marker_ids(tokenizer, template.marker(m["role"]))
        body = _content_ids(tokenizer, m["content"]) + end
        is_answer = m["role"] == "assistant"
        ids += head + body
        answer += [False] * len(head) + [is_answer] * len(body)
    return ids, answer


def chat_prompt_ids(messages: list[dict[str, str]], tokenizer, template: ChatTemplate) -> list[int]:
    """The generation prompt: the rendered chat followed by the assistant marker."""
    ids, _ = encode_chat(messages, tokenizer, template)
    return ids + _marker_ids(tokenizer, template.assistant)


def end_token_id(tokenizer, template: ChatTemplate) -> int:
    """The id generation stops at: the end marker (which must be a single token).

    Raises:
        ZerotuneError: the end marker is not one token of the vocabulary.
    """
    ids = _marker_ids(tokenizer, template.end)
    if len(ids) != 1:
        raise ZerotuneError(f"template.end: {template.end!r} is not a single token of the vocabulary")
    return ids[0]


def example_pair(ids: list[int], answer: list[bool], max_length: int) -> tuple[list[int], list[int]]:
    """(x, y) of one example: x = ids[:-1], y = next token where it is an answer token else −100; truncated."""
    x = ids[:-1][:max_length]
    y = [t if a else IGNORE for t, a in zip(ids[1:], answer[1:], strict=True)][:max_length]
    return x, y


def pack_pairs(pairs: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Greedily concatenate whole (x, y) pairs, in order, into rows of at most ``max_length`` positions."""
    rows: list[tuple[list[int], list[int]]] = []
    x_row: list[int] = []
    y_row: list[int] = []
    for x, y in pairs:
        if x_row and len(x_row) + len(x) > max_length:
            rows.append((x_row, y_row))
            x_row, y_row = [], []
        x_row, y_row = x_row + x, y_row + y
    if x_row:
        rows.append((x_row, y_row))
    return rows


def to_tensors(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows into X (N, L) with ``pad_id`` and Y (N, L) with −100, L the longest row."""
    L = max(len(x) for x, _ in rows)
    X = torch.full((len(rows), L), pad_id, dtype=torch.long)  # (N, L)
    Y = torch.full((len(rows), L), IGNORE, dtype=torch.long)  # (N, L)
    for i, (x, y) in enumerate(rows):
        X[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        Y[i, : len(y)] = torch.tensor(y, dtype=torch.long)
    return X, Y


@dataclass
class SFTData:
    """Rows ready for training: X (N, L) token ids, Y (N, L) targets (−100 = ignored)."""

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor  # (N,) real (unpadded) positions per row
    examples: int
    dropped: int  # examples with no answer token left after truncation

    def __len__(self) -> int:
        return self.x.shape[0]


def build_rows(chats: list[list[dict[str, str]]], tokenizer, template: ChatTemplate, max_length: int,
               packing: bool, pad_id: int) -> SFTData:
    """Encode, label, truncate (and pack) chats into padded tensors.

    Raises:
        ZerotuneError: every example lost its answer to truncation.
    """
    pairs = []
    for chat in chats:
        x, y = example_pair(*encode_chat(chat, tokenizer, template), max_length)
        if any(t != IGNORE for t in y):
            pairs.append((x, y))
    dropped = len(chats) - len(pairs)
    if not pairs:
        raise ZerotuneError(f"sft.max_length: {max_length} positions leave no answer token in any of the "
                            f"{len(chats)} examples; raise it")
    rows = pack_pairs(pairs, max_length) if packing else pairs
    X, Y = to_tensors(rows, pad_id)
    lengths = torch.tensor([len(x) for x, _ in rows])
    return SFTData(X, Y, lengths, len(pairs), dropped)


def split_chats(chats: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``round(fraction · N)`` chats (at least one when fraction > 0), drawn with a seeded generator."""
    if fraction <= 0 or len(chats) < 2:
        return chats, []
    n_val = min(len(chats) - 1, max(1, round(fraction * len(chats))))
    perm = torch.randperm(len(chats), generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(perm[:n_val])
    return [c for i, c in enumerate(chats) if i not in val], [c for i, c in enumerate(chats) if i in val]
