"""``zerotune serve`` (the HTTP server) and ``zerotune chat`` (a conversation in the terminal)."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from zerotune.errors import ZerotuneError
from zerotune.generate import Decoder, check_sampling, load_decoder
from zerotune.run import open_run, read_model_json
from zerotune.serve.engine import Delta, Engine, Finished, Sampling, Sequence
from zerotune.train.loop import pick_device


def _device(name: str) -> torch.device:
    try:
        return pick_device(name)
    except ZerotuneError as e:
        raise ZerotuneError(str(e).replace("train.device", "--device")) from None


def _check_decoder_run(run: str | Path) -> None:
    """The cheap checks, before anything listens: a finished run of a decoder with a tokenizer."""
    r = open_run(run)
    meta = read_model_json(r)
    if meta.get("model", {}).get("arch") != "gpt":
        raise ZerotuneError(f"model.arch {meta.get('model', {}).get('arch')!r} is not a decoder; serve needs gpt",
                            path=r.model_json)
    if not r.tokenizer.is_file():
        raise ZerotuneError("the run has no tokenizer.json; serving needs a text model", path=r.root)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (port 0: a free port chosen by the system).

    Raises:
        ZerotuneError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # the protocol named, so asyncio sets TCP_NODELAY on each connection: without it a streamed chunk
    # waits for the client's delayed ACK (~40 ms on Linux)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        raise ZerotuneError(f"--port {port}: cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") \
            from None
    sock.listen(2048)
    return sock


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          api_key: str | None = None, device: str = "auto", name: str | None = None, threads: int | None = None,
          log: Callable[[str], None] = print) -> None:
    """Serve a decoder run over HTTP until interrupted (Ctrl-C): the OpenAI API under /v1, a chat page at /.

    The model loads in the background; ``GET /health`` says "loading" until it is ready. Prints one line
    ``serving NAME on http://HOST:PORT/`` once the port listens (``port=0`` picks a free one).

    Raises:
        ZerotuneError: not a finished decoder run, the port cannot be bound, or the model fails to load.

    Example:
        >>> zerotune.serve("runs/gpt_sft", port=8000, max_batch=8)
    """
    import uvicorn

    from zerotune.serve.app import State, create_app

    if max_batch < 1 or max_queue < 0:
        raise ZerotuneError(f"--max-batch must be ≥ 1 and --max-queue ≥ 0, got {max_batch} and {max_queue}")
    _check_decoder_run(run)
    dev = _device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    sock = listen(host, port)
    state = State(lambda: load_decoder(run, dev), name or Path(run).resolve().name, max_batch, max_queue, api_key)
    server: uvicorn.Server | None = None

    def failed(message: str) -> None:
        log(f"error: {message}")
        if server is not None:
            server.should_exit = True

    app = create_app(state, on_failure=failed)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log(f"serving {state.name} on http://{shown}:{bound_port}/  (chat page /, OpenAI API /v1, "
        f"batch {max_batch}, queue {max_queue}, {dev.type}{', key required' if api_key else ''})")
    sys.stdout.flush()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.failed:
        raise ZerotuneError(state.failed)


HELP = "/reset starts a new conversation, /exit (or Ctrl-D) ends it"


def chat(run: str | Path, *, system: str | None = None, max_new_tokens: int | None = None, temperature: float = 0.8,
         top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
         device: str = "auto", stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[dict[str, str]]:
    """A conversation with a decoder run in the terminal: each line read is a user turn, the reply streams
    back; the history goes through the run's chat template (or the plain format of
    :class:`zerotune.generate.Decoder`). ``/reset`` forgets the history, ``/exit`` or end of input stops.
    Turns that no longer fit the model's context are dropped, oldest first (a system message stays).

    Returns:
        The conversation as role/content messages.

    Example:
        >>> zerotune.chat("runs/gpt_sft", temperature=0)
    """
    check_sampling(max_new_tokens or 0, temperature, top_k, top_p, repetition_penalty, seed)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    dec = load_decoder(run, _device(device))
    engine = Engine(dec, max_batch=1, max_queue=1)
    interactive = stdin.isatty()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turn = 0
    say = stdout.write
    if interactive:
        say(f"chatting with {dec.name} ({HELP})\n")
    engine.start()
    try:
        while True:
            if interactive:
                say("you> ")
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if text.strip() == "/exit":
                break
            if text.strip() == "/reset":
                history = history[:1] if system else []
                say("(new conversation)\n")
                continue
            if not text.strip():
                continue
            history.append({"role": "user", "content": text})
            prompt = _fitting(dec, history, max_new_tokens)
            if prompt is None:
                history.pop()
                say("(that message is longer than the model's context; it was not sent)\n")
                continue
            ids, history = prompt
            budget = max_new_tokens or dec.block_size - len(ids)
            budget = min(budget, dec.block_size - len(ids))
            s = Sampling(max_tokens=budget, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, seed=None if seed is None else seed + turn,
                         stop=tuple(dec.chat_stops()))
            if interactive:
                say("bot> ")
            reply = _stream(engine, ids, s, stdout)
            say("\n")
            stdout.flush()
            history.append({"role": "assistant", "content": reply})
            turn += 1
    finally:
        engine.stop()
    return history


def _fitting(dec: Decoder, history: list[dict[str, str]], max_new_tokens: int | None):
    """The prompt of the newest turns that fit with room to reply, and that history; None if the last alone
    does not fit."""
    keep_system = bool(history) and history[0]["role"] == "system"
    head, turns = (history[:1], history[1:]) if keep_system else ([], history)
    room = max_new_tokens or 1
    while turns:
        ids = dec.encode_chat(head + turns)
        if len(ids) + room <= dec.block_size:
            return ids, head + turns
        turns = turns[2:] if len(turns) > 2 else []  # drop the oldest user turn and its reply
    return None


def _stream(engine: Engine, ids: list[int], s: Sampling, out: TextIO) -> str:
    done = threading.Event()
    parts: list[str] = []
    end: list[Finished] = []

    def emit(event: Delta | Finished) -> None:
        if isinstance(event, Delta):
            parts.append(event.text)
            out.write(event.text)
            out.flush()
        else:
            end.append(event)
            done.set()

    engine.submit([Sequence(ids, s, emit)])
    done.wait()
    if end[0].reason == "error":
        raise ZerotuneError(f"generation failed: {end[0].message}")
    return "".join(parts)
