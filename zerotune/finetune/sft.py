"""Instruction tuning (supervised fine-tuning, SFT) of a decoder LM on chat-formatted examples.

Data: a JSONL file whose rows are either an instruction triple or a chat:

    {"instruction": "...", "input": "...", "output": "..."}      (+ optional "system")
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

An instruction row becomes [system?] user = instruction (+ "\\n\\n" + input when set),
assistant = output. ``builtin:pydoc_instructions`` is the offline set of
:mod:`zerotune.data.instructions`.

Chat template (:class:`ChatTemplate`, saved with the model as ``RUN/chat_template.json``).
Each message is rendered as

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
end marker closing it — and −100 (ignored) everywhere else. The loss is the cross-entropy
summed over the answer tokens, divided by their number in the batch:

    L = − Σ_{t: y_t ≠ −100} log softmax(f(x)_t)[y_t] / |{t: y_t ≠ −100}|

Truncation keeps the first ``max_length`` positions of x (and y); an example left with no
answer token is dropped (counted in :meth:`SFTTask.describe`).

Packing (``packing: true``) fills each row with whole examples, (x, y) pairs concatenated
back to back, while they fit in ``max_length`` positions, then pads. No target crosses an
example: the last target of one example is its own end marker, and the first position of the
next example is a role marker that is never a target. Attention is NOT confined to an
example: the model runs one causal attention over the whole row, so a later example can
attend to the earlier ones in its row (positions also run on across the row). The loss
still counts only each example's own answer tokens. Unpacked rows hold one example each,
right-padded with the pad id (padding is never a target, and under causal attention it
cannot influence the real positions before it).

Batches are a pure function of (seed, step), like every zerotune task: epoch e uses the
row permutation drawn from a generator seeded with (seed, e).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from zerotune.data.base import DataInfo
from zerotune.errors import ZerotuneError

IGNORE = -100
ROLES = ("system", "user", "assistant")
BUILTIN_INSTRUCTIONS = "builtin:pydoc_instructions"
TEMPLATE_FILE = "chat_template.json"


class ChatTemplate(BaseModel):
    """Role markers of the chat format (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"
    default_system: str | None = None  # a system message put first when an example has none

    def marker(self, role: str) -> str:
        return getattr(self, role)


class SFTConfig(BaseModel):
    """Options of instruction tuning (the ``sft:`` section of a config)."""

    model_config = ConfigDict(extra="forbid")

    template: ChatTemplate = ChatTemplate()
    max_length: int | None = Field(None, ge=2)  # positions per row; None: model.block_size
    packing: bool = False  # several whole examples per row (see the module docstring)


# ---------------------------------------------------------------- template I/O


def save_chat_template(template: ChatTemplate, path: str | Path) -> Path:
    """Write the template as JSON to ``path`` (a file, or a folder that gets ``chat_template.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / TEMPLATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(template.model_dump_json(indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_chat_template(path: str | Path) -> ChatTemplate:
    """Read a template written by :func:`save_chat_template` (a file, or a folder holding one).

    Raises:
        ZerotuneError: missing file, invalid JSON or unknown keys (named).
    """
    from pydantic import ValidationError

    path = Path(path)
    if path.is_dir():
        path = path / TEMPLATE_FILE
    if not path.is_file():
        raise ZerotuneError("chat template not found", path=path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZerotuneError(f"not a chat template (invalid JSON: {e})", path=path) from None
    if not isinstance(raw, dict):
        raise ZerotuneError("not a chat template (expected a JSON object)", path=path)
    try:
        return ChatTemplate.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ZerotuneError(f"{where}: {err['msg']}", path=path) from None


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
        from zerotune.data.instructions import pydoc_instructions

        return [messages_from_row(r, BUILTIN_INSTRUCTIONS) for r in pydoc_instructions()]
    kind, sep, arg = spec.partition(":")
    if sep and kind == "builtin":
        raise ZerotuneError(f"data spec {spec!r}: unknown builtin instruction set; use {BUILTIN_INSTRUCTIONS}")
    path = Path(arg if sep and kind == "jsonl" else spec)
    if not path.is_file():
        raise ZerotuneError("instruction file not found", path=path)
    chats = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ZerotuneError(f"line {n}: invalid JSON ({e.msg})", path=path) from None
            chats.append(messages_from_row(row, f"{path}: line {n}"))
    if not chats:
        raise ZerotuneError("no instruction rows", path=path)
    return chats


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


def render_chat(messages: list[dict[str, str]], template: ChatTemplate, add_generation_prompt: bool = False) -> str:
    """The chat as text, markers included (what :func:`encode_chat` encodes, for display and logs)."""
    text = "".join(template.marker(m["role"]) + m["content"] + template.end
                   for m in _with_default_system(messages, template))
    return text + (template.assistant if add_generation_prompt else "")


def decode_chat(ids: list[int], tokenizer, template: ChatTemplate) -> list[dict[str, str]]:
    """Split token ids rendered by :func:`encode_chat` back into messages (markers must be single tokens).

    Raises:
        ZerotuneError: a marker that is not one token, or ids that do not follow the template.
    """
    markers = {}
    for role in (*ROLES, "end"):
        m = _marker_ids(tokenizer, template.marker(role))
        if len(m) != 1:
            raise ZerotuneError(f"template.{role}: {template.marker(role)!r} is not a single token of the vocabulary")
        markers[m[0]] = role
    messages: list[dict[str, str]] = []
    role, body = None, []
    for t in ids:
        kind = markers.get(t)
        if kind is None:
            if role is None:
                raise ZerotuneError("token ids do not start with a role marker")
            body.append(t)
        elif kind == "end":
            if role is None:
                raise ZerotuneError("end marker without an open message")
            messages.append({"role": role, "content": tokenizer.decode(body, skip_special_tokens=False)})
            role, body = None, []
        else:
            if role is not None:
                raise ZerotuneError(f"{kind} marker inside an open {role} message")
            role = kind
    if role is not None:
        raise ZerotuneError(f"the last {role} message has no end marker")
    return messages


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


# ---------------------------------------------------------------- the task


class SFTTask:
    """The task protocol of :mod:`zerotune.train.tasks` for instruction tuning (see the module docstring)."""

    unit = "tokens"

    def __init__(self, train: SFTData, val: SFTData | None, *, tokenizer, template: ChatTemplate,
                 max_length: int, packing: bool, batch_size: int, seed: int,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.train, self.val = train, val
        self.template, self.max_length, self.packing = template, max_length, packing
        self.batch_size, self.seed = batch_size, seed
        self._tokenizer = tokenizer
        from zerotune.train.tasks import EpochOrder  # here: zerotune.config imports this module

        self.n = len(train)
        self.order = EpochOrder(self.n, batch_size, seed, self.device)
        self.steps_per_epoch = self.order.steps_per_epoch
        # throughput counts real positions, not padding
        self.units_per_example = max(1, round(float(train.lengths.float().mean())))
        from zerotune.data.tokenizer import special_ids

        pad = special_ids(tokenizer)["pad"]
        self.info = DataInfo("tokens", [max_length], target="causal_lm", vocab_size=tokenizer.get_vocab_size(),
                             pad_id=pad)
        self._x, self._y, self._len = train.x.to(self.device), train.y.to(self.device), train.lengths.to(self.device)

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def has_val(self) -> bool:
        return self.val is not None and len(self.val) > 0

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of optimizer step ``step`` (rank's share of them), cut to the longest row in the batch."""
        index = self.order.indices(step)
        width = int(self._len[index].max())
        if world_size > 1:
            from zerotune.train.tasks import share  # here: zerotune.config imports this module

            index = index[share(len(index), rank, world_size)]
        return self._x[index, :width], self._y[index, :width]  # (B, T), (B, T)

    def count(self, y: torch.Tensor) -> int:
        return int((y != IGNORE).sum())

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                               reduction="sum")  # (B·T, V) vs (B·T,)

    def evaluate_split(self, model: nn.Module, data: SFTData) -> dict[str, float]:
        """Mean loss, perplexity and next-token accuracy over the answer tokens of ``data``."""
        return self.eval_result(self.eval_sums(model, data))

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, data: SFTData, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Summed loss, answer tokens and correct next-token predictions over the batches rank,
        rank + W, ... of ``data``; summed over the W ranks they are the one-process sums. Every
        rank runs the same number of forwards (FSDP): a short share ends with a dummy one."""
        was_training = model.training
        model.eval()
        total, tokens, correct = 0.0, 0, 0
        starts = range(0, len(data), self.batch_size)
        for i in starts[rank::world_size]:
            width = int(data.lengths[i : i + self.batch_size].max())
            x = data.x[i : i + self.batch_size, :width].to(self.device)  # (B, T)
            y = data.y[i : i + self.batch_size, :width].to(self.device)  # (B, T)
            out = model(x)  # (B, T, V)
            total += float(self.loss(out, y))
            keep = y != IGNORE
            tokens += int(keep.sum())
            correct += int((out.argmax(-1) == y)[keep].sum())
        if len(starts[rank::world_size]) < len(starts[0::world_size]):  # one batch fewer than rank 0
            model(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        model.train(was_training)
        return torch.tensor([total, tokens, correct], dtype=torch.float64)

    def eval_result(self, sums: torch.Tensor) -> dict[str, float]:
        from zerotune.train.tasks import token_metrics  # here: zerotune.config imports this module

        return token_metrics(sums, "token_accuracy")

    def evaluate_val(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_split(model, self.val)

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_val(model) if self.has_val else {}

    def extra_log(self, record: dict) -> dict:
        return {}

    def describe(self) -> str:
        val = f"{self.val.examples:,}" if self.val is not None else "no"
        dropped = self.train.dropped + (self.val.dropped if self.val is not None else 0)
        packed = f" packed into {self.n:,} rows" if self.packing else ""
        note = f" · {dropped} dropped (no answer token within max_length)" if dropped else ""
        return (f"{self.train.examples:,} training examples{packed} · {val} val examples · "
                f"max_length {self.max_length}{note}")

    def model_meta(self) -> dict:
        return {"chat_template": self.template.model_dump(mode="json")}


def split_chats(chats: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``round(fraction · N)`` chats (at least one when fraction > 0), drawn with a seeded generator."""
    if fraction <= 0 or len(chats) < 2:
        return chats, []
    n_val = min(len(chats) - 1, max(1, round(fraction * len(chats))))
    perm = torch.randperm(len(chats), generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(perm[:n_val])
    return [c for i, c in enumerate(chats) if i not in val], [c for i, c in enumerate(chats) if i in val]


def make_sft_task(cfg, tokenizer, device: torch.device | str = "cpu", sft: SFTConfig | None = None) -> SFTTask:
    """Build the instruction-tuning task from a :class:`zerotune.config.Config`.

    Reads ``cfg.data.train`` (instruction spec), ``cfg.data.val`` (a second spec) or else
    ``cfg.data.val_split``, ``cfg.seed``, ``cfg.train.batch_size``; ``sft`` defaults to ``cfg.sft``
    when the config has that section, else :class:`SFTConfig` defaults. ``max_length`` defaults to
    ``cfg.model.block_size`` and may not exceed it.

    Raises:
        ZerotuneError: bad data (file and line named), a max_length over the model's block size,
            a tokenizer without a pad id and no vocabulary.
    """
    sft = sft or getattr(cfg, "sft", None) or SFTConfig()
    block = getattr(cfg.model, "block_size", None)
    max_length = sft.max_length or block or 512
    if block is not None and max_length > block:
        raise ZerotuneError(f"sft.max_length: {max_length} is longer than model.block_size {block}")
    if tokenizer is None:
        raise ZerotuneError("data.tokenizer: instruction tuning needs a tokenizer (set data.tokenizer)")
    from zerotune.data.tokenizer import special_ids

    pad = special_ids(tokenizer)["pad"]
    pad = 0 if pad is None else pad
    chats = load_instructions(cfg.data.train)
    if cfg.data.val:
        train_chats, val_chats = chats, load_instructions(cfg.data.val)
    else:
        train_chats, val_chats = split_chats(chats, cfg.data.val_split, cfg.seed)
    train = build_rows(train_chats, tokenizer, sft.template, max_length, sft.packing, pad)
    # validation rows are never packed, so val loss does not depend on the packing choice
    val = build_rows(val_chats, tokenizer, sft.template, max_length, False, pad) if val_chats else None
    return SFTTask(train, val, tokenizer=tokenizer, template=sft.template, max_length=max_length,
                   packing=sft.packing, batch_size=cfg.train.batch_size, seed=cfg.seed, device=device)


__all__ = [
    "ChatTemplate", "SFTConfig", "SFTTask", "SFTData", "build_rows", "chat_prompt_ids", "decode_chat",
    "encode_chat", "end_token_id", "example_pair", "load_chat_template", "load_instructions", "make_sft_task",
    "messages_from_row", "pack_pairs", "render_chat", "save_chat_template", "split_chats", "to_tensors",
]
