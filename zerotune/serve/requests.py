"""The request bodies the server accepts, as the OpenAI API defines them, checked strictly.

A field of the wrong type, out of range or unknown is refused with the field's name; nothing is coerced
(``"max_tokens": "10"`` is an error, as it is for the OpenAI API). Extensions: ``top_k`` (keep the k most
likely tokens), ``repetition_penalty`` (CTRL's, as ``zerotune generate``), and ``seed`` also fixes a
sampled reply (choice j of ``n`` uses seed + j).
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class Common(Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=100, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, le=10, allow_inf_nan=False)
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise ValueError("expected a non-empty string or a list of up to 4 of them")
        return v

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(Common):
    prompt: Any  # a string, a list of strings, a list of token ids, or a list of such lists
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or ids(v):
            return v
        if isinstance(v, list) and v and all(isinstance(p, str) or ids(p) for p in v):
            return v
        raise ValueError("expected a string, a list of strings, or token ids (a list of integers, or a list of "
                         "such lists)")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def turns(self) -> list[dict[str, str]]:
        """The messages as role/content pairs (``developer`` is the newer name of ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def parse(kind: type[Strict], body: Any) -> Strict:
    """Validate a decoded JSON body.

    Raises:
        BadRequest: the first problem, with the field's dotted path as ``param``.
    """
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a misspelt key first
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in _UNION_TAGS))]
        param = ".".join(loc) or None
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _fields_at(kind, loc[:-1]), n=1, cutoff=0.6)
            message = f"{param}: unknown field" + (f"; did you mean {close[0]!r}?" if close else "")
        elif err["type"] == "missing":
            message = f"{param}: required"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            message = f"{param}: {msg[:1].lower() + msg[1:]}, got {err.get('input')!r}"
        raise BadRequest(message, param) from None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "none", "function-after", "function-before"}


def _fields_at(kind: type[BaseModel], path: list[str]) -> list[str]:
    """The field names of the object at ``path`` inside ``kind`` (for "did you mean")."""
    for part in path:
        if part.isdigit():
            continue
        info = kind.model_fields.get(part)
        inner = getattr(info, "annotation", None)
        found = [t for t in getattr(inner, "__args__", (inner,)) if isinstance(t, type) and issubclass(t, BaseModel)]
        found += [a for t in getattr(inner, "__args__", ()) for a in getattr(t, "__args__", ())
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if not found:
            return []
        kind = found[0]
    return list(kind.model_fields)
