"""The OpenAI-compatible HTTP server: Starlette routes around one :class:`~zerotune.serve.engine.Engine`.

    GET  /                      the chat page (one self-contained HTML file)
    GET  /health                {"status": "ok"} (200), {"status": "loading"} (503) while the model loads
    GET  /metrics               Prometheus text (zerotune.serve.metrics)
    GET  /v1/models             the one model served
    POST /v1/completions        OpenAI completions: prompt, max_tokens (default 16), temperature, top_p,
                                top_k, n, stop, seed, stream, logprobs, presence/frequency_penalty,
                                repetition_penalty (an extension, as zerotune generate)
    POST /v1/chat/completions   OpenAI chat completions: messages (rendered by the run's chat template),
                                max_tokens / max_completion_tokens (default: the rest of the context),
                                logprobs + top_logprobs, and the fields above

Every error is a JSON body ``{"error": {"message", "type", "param", "code"}}``: 400 for a body that is not
JSON, too large, or has a field of the wrong type, out of range or unknown (named in ``param``); 401 for a
missing or wrong key when the server has one (``Authorization: Bearer KEY``, on /v1 only); 404 for an
unknown path or model; 429 when the wait queue is full; 503 while loading. Streams are server-sent events,
one ``data: {chunk}`` per piece of text, then ``data: [DONE]``. A client that goes away frees its rows.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from zerotune.errors import ZerotuneError
from zerotune.generate import Decoder
from zerotune.serve.engine import Delta, Engine, Finished, QueueFull, Refused, Sampling, Sequence
from zerotune.serve.metrics import Metrics
from zerotune.serve.requests import BadRequest, ChatRequest, CompletionRequest, parse

MAX_BODY = 1 << 20  # bytes of a request body


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object, as a response body or a stream's last event."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status)


class Mailbox:
    """Events from the engine's thread to the event loop: whatever arrives before the loop runs again
    is delivered by one wake-up (not one per token per stream)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, collections.deque()
            self.scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


class State:
    """What the routes share: the decoder (once loaded), its engine, the metrics."""

    def __init__(self, load: Callable[[], Decoder], name: str | None, max_batch: int, max_queue: int,
                 api_key: str | None) -> None:
        self.load, self.name = load, name
        self.max_batch, self.max_queue, self.api_key = max_batch, max_queue, api_key
        self.metrics = Metrics(max_batch)
        self.decoder: Decoder | None = None
        self.engine: Engine | None = None
        self.failed: str | None = None
        self.created = int(time.time())
        self.ready = threading.Event()
        self._mailbox: Mailbox | None = None

    def mailbox(self) -> Mailbox:
        """The mailbox of the running event loop (made on the first request)."""
        if self._mailbox is None:
            self._mailbox = Mailbox(asyncio.get_running_loop())
        return self._mailbox

    def start(self) -> None:
        """Load the model and start the engine (run in a thread: the server answers /health meanwhile)."""
        try:
            self.decoder = self.load()
            self.name = self.name or self.decoder.name
            self.engine = Engine(self.decoder, self.max_batch, self.max_queue, on_step=self.metrics.step)
            self.engine.start()
        except ZerotuneError as e:
            self.failed = str(e)
        except Exception as e:  # the model itself failed to load: the server says so and keeps answering
            self.failed = f"{type(e).__name__}: {e}"
        finally:
            self.ready.set()


def create_app(state: State, on_failure: Callable[[str], None] | None = None) -> Starlette:
    """The ASGI app; it loads the model in a thread when it starts, and stops the engine when it ends."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        def load() -> None:
            state.start()
            if state.failed and on_failure is not None:
                on_failure(state.failed)

        threading.Thread(target=load, name="zerotune-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/health", partial(health, state), methods=["GET"]),
        Route("/metrics", partial(metrics, state), methods=["GET"]),
        Route("/v1/models", partial(guarded, state, "models", models), methods=["GET"]),
        Route("/v1/completions", partial(guarded, state, "completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", partial(guarded, state, "chat", chat), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_allowed, 500: server_error})
    app.state.zerotune = state
    return app


async def page(request: Request) -> Response:
    return HTMLResponse(resources.files("zerotune.serve").joinpath("page.html").read_text(encoding="utf-8"))


async def health(state: State, request: Request) -> Response:
    if state.failed:
        return JSONResponse({"status": "error", "message": state.failed}, 500)
    if state.engine is None:
        return JSONResponse({"status": "loading"}, 503)
    return JSONResponse({"status": "ok", "model": state.name, "running": state.engine.running,
                         "queued": state.engine.queued})


async def metrics(state: State, request: Request) -> Response:
    engine = state.engine

    def gauges() -> dict[str, int]:
        return {"queue_length": engine.queued if engine else 0, "running_sequences": engine.running if engine else 0,
                "max_batch": state.max_batch}

    return PlainTextResponse(state.metrics.text(gauges), media_type="text/plain; version=0.0.4")


async def not_found(request: Request, exc: Exception) -> Response:
    return error(404, f"{request.url.path}: no such endpoint", code="not_found")


async def not_allowed(request: Request, exc: Exception) -> Response:
    return error(405, f"{request.method} {request.url.path}: method not allowed")


async def server_error(request: Request, exc: Exception) -> Response:
    return error(500, f"{type(exc).__name__}: {exc}", kind="server_error")


async def guarded(state: State, endpoint: str, handler, request: Request) -> Response:
    """One endpoint behind the key check and the readiness check, its request errors answered; counted."""
    response = await _refused_or_answered(state, request, handler)
    state.metrics.request(endpoint, response.status_code)
    return response


async def _refused_or_answered(state: State, request: Request, handler) -> Response:
    if state.api_key is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
            return error(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                         code="invalid_api_key")
    if state.engine is None:
        return error(503, state.failed or "the model is still loading", kind="server_error")
    try:
        return await handler(state, request)
    except BadRequest as e:
        return error(400, e.message, param=e.param)
    except QueueFull as e:
        return error(429, str(e), kind="rate_limit_error", code="rate_limit_exceeded")


async def read_json(request: Request) -> Any:
    """The decoded JSON body. A body over the limit is read on (up to 16 times the limit, then the
    connection is dropped) and refused, so the client is done sending when the 400 reaches it."""
    size = 0
    parts = []
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY:
            parts.append(chunk)
        elif size > 16 * MAX_BODY:
            break
    if size > MAX_BODY:
        raise BadRequest(f"the body is over the limit of {MAX_BODY:,} bytes")
    try:
        return json.loads(b"".join(parts))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None


async def models(state: State, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": state.name, "object": "model", "created": state.created, "owned_by": "zerotune",
         "max_model_len": state.decoder.block_size}]})


def sampling(req, max_tokens: int, seed_offset: int, logprobs: int | None, stops: tuple[str, ...]) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                    seed=None if req.seed is None else (req.seed + seed_offset) % 2**63, stop=stops,
                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                    repetition_penalty=req.repetition_penalty, logprobs=logprobs)


def check_model(state: State, req) -> None:
    if req.model is not None and req.model != state.name:
        raise BadRequest(f"model: {req.model!r} is not served here; this server serves {state.name!r}", "model")


async def completions(state: State, request: Request) -> Response:
    req = parse(CompletionRequest, await read_json(request))
    check_model(state, req)
    dec = state.decoder
    prompts = [dec.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
    plans = [(ids, sampling(req, req.max_tokens, j, req.logprobs, req.stops())) for ids in prompts
             for j in range(req.n)]
    return await answer(state, request, req, plans, chat=False)


async def chat(state: State, request: Request) -> Response:
    req = parse(ChatRequest, await read_json(request))
    check_model(state, req)
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("top_logprobs: needs logprobs: true", "top_logprobs")
    dec = state.decoder
    ids = dec.encode_chat(req.turns())
    max_tokens = req.max_completion_tokens or req.max_tokens or max(1, dec.block_size - len(ids))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    stops = req.stops() + tuple(dec.chat_stops())
    plans = [(ids, sampling(req, max_tokens, j, logprobs, stops)) for j in range(req.n)]
    return await answer(state, request, req, plans, chat=True)


async def answer(state: State, request: Request, req, plans: list[tuple[list[int], Sampling]], chat: bool) -> Response:
    """Run the sequences; a stream of chunks, or one response when they are all done."""
    engine = state.engine
    for ids, s in plans:
        try:
            engine.check(ids, s)
        except Refused as e:
            field = "messages" if chat and e.field == "prompt" else e.field
            raise BadRequest(f"{field}: {e}", field) from None
    mailbox = state.mailbox()
    events: asyncio.Queue = asyncio.Queue()

    seqs: list[Sequence] = []

    def emitter(i: int) -> Callable[[Delta | Finished], None]:
        def emit(event: Delta | Finished) -> None:  # in the engine's thread
            if isinstance(event, Finished):  # counted here: a client that went away reads nothing more
                s = seqs[i]
                state.metrics.sequence(event.reason, event.prompt_tokens, event.completion_tokens, s.queued_at,
                                       s.first_token_at, time.perf_counter())
            mailbox.post(events, (i, event))
        return emit

    seqs += [Sequence(ids, s, emitter(i)) for i, (ids, s) in enumerate(plans)]
    engine.submit(seqs)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    prompt_tokens = sum(len(ids) for ids, _ in plans[:: req.n])  # each prompt once, not once per choice

    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        async def stream() -> AsyncIterator[str]:
            open_ = set(range(len(seqs)))
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0}
            sent = [0] * len(seqs)  # characters of each choice's text sent so far (completions' text_offset)
            try:
                if chat:
                    for i in range(len(seqs)):
                        yield sse(chunk(rid, created, state.name, chat, i, {"role": "assistant", "content": ""}))
                while open_:
                    arrived = [await events.get()]
                    while not events.empty():  # all that came meanwhile goes out in one write
                        arrived.append(events.get_nowait())
                    out = []
                    for i, event in arrived:
                        if isinstance(event, Delta):
                            if event.text or event.logprobs:
                                lp = logprob_field(event.logprobs, chat, sent[i]) if event.logprobs else None
                                out.append(sse(chunk(rid, created, state.name, chat, i, event.text, lp=lp)))
                                sent[i] += sum(len(t) for t, _, _ in event.logprobs or [])
                            continue
                        open_.discard(i)
                        usage["completion_tokens"] += event.completion_tokens
                        if event.reason == "error":
                            yield "".join(out) + sse(error_body(event.message, kind="server_error"))
                            return
                        out.append(sse(chunk(rid, created, state.name, chat, i, {} if chat else "",
                                             reason=event.reason)))
                    yield "".join(out)
                if include_usage:
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield sse({"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                               "model": state.name, "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
            finally:
                engine.cancel([s for k, s in enumerate(seqs) if k in open_])

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts = [""] * len(seqs)
    lps: list[list] = [[] for _ in seqs]
    ends: dict[int, Finished] = {}

    async def collect() -> None:
        while len(ends) < len(seqs):
            i, event = await events.get()
            if isinstance(event, Delta):
                texts[i] += event.text
                lps[i] += event.logprobs or []
            else:
                ends[i] = event

    task = asyncio.ensure_future(collect())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)  # nobody is listening; the rows are freed below
    finally:
        engine.cancel([s for k, s in enumerate(seqs) if k not in ends])
    failed = [e for e in ends.values() if e.reason == "error"]
    if failed:
        return error(500, failed[0].message, kind="server_error")
    choices = []
    for i in range(len(seqs)):
        lp = logprob_field(lps[i], chat, 0) if plans[i][1].logprobs is not None else None
        body = {"message": {"role": "assistant", "content": texts[i]}} if chat else {"text": texts[i]}
        choices.append({"index": i, **body, "logprobs": lp, "finish_reason": ends[i].reason})
    completion_tokens = sum(e.completion_tokens for e in ends.values())
    return JSONResponse({"id": rid, "object": kind, "created": created, "model": state.name, "choices": choices,
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens}})


def chunk(rid: str, created: int, model: str, chat: bool, index: int, content, reason: str | None = None,
          lp: Any = None) -> dict:
    if chat:
        delta = content if isinstance(content, dict) else {"content": content}
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": index, "text": content, "logprobs": lp, "finish_reason": reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def logprob_field(entries: list, chat: bool, offset: int) -> dict:
    """OpenAI's logprobs object: chat's ``{"content": [...]}`` or completions' parallel lists."""
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())} for a, b in alts]}
                            for t, lp, alts in entries]}
    offsets, at = [], offset
    for t, _, _ in entries:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(alts) for _, _, alts in entries], "text_offset": offsets}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
