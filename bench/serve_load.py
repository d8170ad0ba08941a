"""``zerotune serve`` under concurrent load: throughput, latency percentiles, errors and memory.

The script starts ``python -m zerotune serve RUN --port 0`` itself (this checkout, loopback only, with
``--max-batch``, ``--max-queue`` and ``--threads`` passed through), waits for ``GET /health``, and always
stops it at the end (also on an error, Ctrl-C or SIGTERM). For each concurrency level K of ``--clients``
it runs K client threads (``http.client``, TCP_NODELAY) that together send ``--requests`` streaming
``POST /v1/completions``: ``max_tokens`` = ``--max-tokens``, ``temperature`` 0.8, ``seed`` = ``--seed`` +
the request's number, a prompt from a fixed list of 8, ``stream_options.include_usage``. Request i has the
same prompt and seed at every level, so every level asks for the same generations (the server samples a
seeded request alike alone or in a batch). One ``--warmup`` request goes first, uncounted, and the script
waits for the server to be idle before each level. Each client keeps one connection alive, as SDK clients
do; ``--fresh-connections`` opens a new one per request instead, which separates what TCP does on a
reused connection (Nagle's algorithm against delayed ACKs, when the server does not set TCP_NODELAY:
about 40 ms on Linux) from the generation itself.

Per level, over the requests that succeeded:

    requests/s           requests ÷ wall time (first request sent → last stream ended)
    tokens/s             generated tokens ÷ wall time; tokens are the ``usage.completion_tokens`` of each
                         stream (the server's count; chunks are not counted, a chunk may hold several)
    vs 1 client          tokens/s ÷ tokens/s of the 1-client level (or of the first level)
    TTFT                 p50 / p95 / p99 of request sent → first chunk with text (queueing + prefill)
    per token            p50 / p95 / p99 over requests of (last text chunk − first) / (tokens − 1), the
                         request's mean time per output token after the first (what the server's
                         ``zerotune_time_per_output_token_seconds`` histogram records)
    chunk gap p99        p99 over all gaps between consecutive text chunks: the stalls a reader sees
                         (a new request's prefill holds up the whole batch for one step)
    batch rows           mean rows per decode step during the level (``/metrics`` deltas)
    RSS                  the server process's peak (VmHWM, since it started) and current (VmRSS) resident
                         memory after the level, from /proc/PID/status (Linux)

An error is a request that got a status other than 200, a stream with an error event, no usage or no
``data: [DONE]``, a broken connection, or that ran past ``--timeout`` seconds (the connection is closed,
which cancels it on the server). Percentiles interpolate linearly between order statistics (numpy's
default). The clients share the machine with the server: on a small CPU, 16 client threads parsing
chunks take some of its time.

``--soak SECONDS`` instead runs K = the last ``--clients`` value continuously for that long, samples the
server's VmRSS every ``--sample-every`` seconds (the first sample just before the clients start, the last
once they are done), and reports first / max / last RSS, last − first, the least-squares slope over all
samples, and "grew" when last − first exceeds ``--grow-mb``; plus errors, throughput and latencies.

``--compare-hf`` runs the same load, afterwards, against a baseline: the run exported with
``zerotune export RUN --format hf``, loaded by ``transformers`` ``AutoModelForCausalLM``, and generated
by plain ``model.generate(do_sample=True, temperature=0.8, top_k=0)`` one request at a time behind a
minimal stdlib HTTP server that this script starts (``--hf-server``: the same SSE chunks and usage, one
chunk per token, TCP_NODELAY). It is skipped, with the reason, when the export or ``transformers`` fails.

Output: a Markdown table on stdout (progress goes to stderr); ``--json FILE`` writes everything, with
each request's timings. The demo's GPT (``zerotune demo`` writes ``runs/demo/pydoc_gpt``):

    python bench/serve_load.py runs/demo/pydoc_gpt --clients 1,4,16 --requests 32 --max-tokens 64 \\
        --max-batch 16 --threads 2 --compare-hf --json serve_load.json
    python bench/serve_load.py runs/demo/pydoc_gpt --clients 16 --max-batch 16 --threads 2 \\
        --soak 600 --sample-every 10 --json serve_soak.json
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # serve the checkout this script belongs to

from zerotune.errors import ZerotuneError  # noqa: E402
from zerotune.run import open_run, read_model_json  # noqa: E402

HOST = "127.0.0.1"
PROMPTS = ("The with statement", "A class definition", "The import system", "Exceptions are",
           "In an assignment", "Numbers are", "The for statement", "Objects are")


# ------------------------------------------------------------------ statistics


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0–100), interpolated linearly between order statistics like ``numpy.percentile``;
    None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "mean": sum(values) / len(values) if values else None, "n": len(values)}


# ------------------------------------------------------------------ the server process


def memory_mb(pid: int) -> dict[str, float | None]:
    """The process's current (VmRSS) and peak (VmHWM) resident memory in MB; None off Linux or once it ended."""
    out: dict[str, float | None] = {"rss": None, "peak": None}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for key, name in (("VmRSS", "rss"), ("VmHWM", "peak")):
        found = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        if found:
            out[name] = int(found.group(1)) / 1024
    return out


class ServerFailed(RuntimeError):
    """The server did not start, exited, or failed to load its model."""


class Server:
    """A server in a child process on a free loopback port: started, waited for, always stopped."""

    def __init__(self, cmd: list[str], startup_timeout: float) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env=env)
        self.pid = self.proc.pid
        self.log: collections.deque[str] = collections.deque(maxlen=200)  # its output, read on so it never blocks
        self.port: int | None = None
        self.banner = ""  # the line that gave the URL
        self._listening = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            self._wait(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            found = self.port is None and re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if found:
                self.port, self.banner = int(found.group(1)), line.strip()
                self._listening.set()
        self._listening.set()  # it ended

    def tail(self, n: int = 20) -> str:
        return "\n".join(list(self.log)[-n:])

    def _wait(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        self._listening.wait(timeout)
        if self.port is None:
            raise ServerFailed(f"the server did not start:\n{self.tail()}")
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise ServerFailed(f"the server exited with status {self.proc.returncode}:\n{self.tail()}")
            try:
                status, body = get(self.port, "/health")
                state = json.loads(body).get("status")
            except (OSError, ValueError):
                status, state = None, None
            if status == 200 and state == "ok":
                return
            if state == "error":
                raise ServerFailed(f"the server failed to load the model: {json.loads(body).get('message')}")
            time.sleep(0.2)
        raise ServerFailed(f"the server was not ready after {timeout:.0f} s:\n{self.tail()}")

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no sequence runs or waits (cancelled ones from timed-out requests are let go first)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                health = json.loads(get(self.port, "/health")[1])
                if not health.get("running") and not health.get("queued"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def scrape(port: int) -> dict[str, float]:
    """The server's Prometheus samples, ``name{labels}`` → value ({} when it has none)."""
    try:
        status, text = get(port, "/metrics")
    except OSError:
        return {}
    out = {}
    for line in text.splitlines() if status == 200 else []:
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


# ------------------------------------------------------------------ the clients


@dataclass
class Result:
    """One request: times in seconds on the client's ``perf_counter`` clock."""

    index: int
    start: float
    end: float = 0.0
    ok: bool = False
    status: int | None = None
    error: str | None = None
    tokens: int = 0  # usage.completion_tokens
    ttft: float | None = None
    tpot: float | None = None
    gaps: list[float] = field(default_factory=list)  # between consecutive text chunks


class Client:
    """One keep-alive connection that sends streaming completions and times their chunks."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def complete(self, index: int, body: dict) -> Result:
        r = Result(index, time.perf_counter())
        try:
            self._stream(r, json.dumps(body).encode())
        except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: a chunk that is not JSON
            r.error = "timeout" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
            self.close()  # the server sees the client go and frees its row
        r.end = time.perf_counter()
        return r

    def _stream(self, r: Result, body: bytes) -> None:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        if self.conn.sock is None:  # a new connection, or the server closed the last one
            self.conn.connect()
            # http.client sends the headers and the body in two writes: without this, Nagle holds the body
            # back until the server's delayed ACK (~40 ms on Linux), which the client would then measure
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json",
                                                             "Accept": "text/event-stream"})
        resp = self.conn.getresponse()
        r.status = resp.status
        if resp.status != 200:
            text = resp.read().decode("utf-8", "replace")
            try:
                text = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            r.error = f"HTTP {resp.status}: {text[:200]}"
            return
        times: list[float] = []
        done = False
        while True:
            left = self.timeout - (time.perf_counter() - r.start)
            if left <= 0:
                raise TimeoutError
            self.conn.sock.settimeout(left)  # the whole request is bounded, not each read
            line = resp.readline()
            now = time.perf_counter()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                resp.read()  # the end of the chunked body, so that the connection can be used again
                break
            event = json.loads(data)
            if "error" in event:
                r.error = f"stream error: {event['error'].get('message')}"
                self.close()
                return
            if event.get("usage"):
                r.tokens = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices", [])):
                times.append(now)
        if not done:
            r.error = "the stream ended without data: [DONE]"
            self.close()
            return
        if not r.tokens and times:
            r.error = "no usage in the stream"
            return
        r.ok = True
        if times:
            r.ttft = times[0] - r.start
            r.gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            if r.tokens > 1:
                r.tpot = (times[-1] - times[0]) / (r.tokens - 1)


def request_body(index: int, args) -> dict:
    return {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0.8,
            "seed": args.seed + index, "stream": True, "stream_options": {"include_usage": True}}


def load(port: int, clients: int, args, requests: int | None = None, seconds: float | None = None,
         first: int = 0, on_result=None) -> list[Result]:
    """K client threads that together send ``requests`` requests (numbered from ``first``), or keep sending
    until ``seconds`` have passed (then finish the ones in flight)."""
    numbers = iter(range(first, first + requests) if requests is not None else range(first, sys.maxsize))
    take = threading.Lock()
    results: list[Result] = []
    deadline = None if seconds is None else time.perf_counter() + seconds

    def worker() -> None:
        client = Client(port, args.timeout)
        try:
            while deadline is None or time.perf_counter() < deadline:
                with take:
                    i = next(numbers, None)
                if i is None:
                    break
                r = client.complete(i, request_body(i, args))
                if args.fresh_connections:
                    client.close()
                with take:
                    results.append(r)
                if on_result is not None:
                    on_result(r)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: r.index)


def summary(results: list[Result], clients: int, before: dict[str, float], after: dict[str, float],
            mem: dict[str, float | None]) -> dict:
    ok = [r for r in results if r.ok]
    wall = max(r.end for r in results) - min(r.start for r in results) if results else 0.0
    tokens = sum(r.tokens for r in ok)

    def delta(name: str) -> float | None:
        return after[name] - before.get(name, 0.0) if name in after else None

    rows, steps = delta("zerotune_batch_rows_sum"), delta("zerotune_batch_rows_count")
    t0 = min((r.start for r in results), default=0.0)
    return {
        "clients": clients, "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "error_kinds": collections.Counter(r.error for r in results if not r.ok).most_common(5),
        "wall_s": wall, "requests_per_s": len(ok) / wall if wall else None,
        "tokens": tokens, "tokens_per_s": tokens / wall if wall else None,
        "server_generation_tokens": delta("zerotune_generation_tokens_total"),
        "ttft_s": spread([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": spread([r.tpot for r in ok if r.tpot is not None]),
        "chunk_gap_s": spread([g for r in ok for g in r.gaps]),
        "mean_batch_rows": rows / steps if rows is not None and steps else None,
        "decode_steps": steps,
        "rss_mb": mem,
        "per_request": [{**{k: v for k, v in asdict(r).items() if k != "gaps"}, "start": r.start - t0,
                         "end": r.end - t0} for r in results],
    }


def run_levels(server: Server, args) -> list[dict]:
    levels = []
    for k in args.clients:
        server.wait_idle()
        before = scrape(server.port)
        say(f"  {k} client{'s' if k > 1 else ''}, {args.requests} requests ...")
        results = load(server.port, k, args, requests=args.requests)  # the same requests at every level
        server.wait_idle()
        level = summary(results, k, before, scrape(server.port), memory_mb(server.pid))
        say(f"    {level['tokens_per_s'] or 0:,.0f} tokens/s, {level['errors']} errors")
        levels.append(level)
    base = next((lv for lv in levels if lv["clients"] == 1), levels[0] if levels else None)
    for lv in levels:
        lv["speedup"] = ratio(lv["tokens_per_s"], base["tokens_per_s"])
    return levels


def run_soak(server: Server, args) -> dict:
    k = args.clients[-1]
    server.wait_idle()
    before = scrape(server.port)
    samples = []
    done = {"requests": 0, "tokens": 0, "errors": 0}
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.perf_counter()

    def count(r: Result) -> None:
        with lock:
            done["requests"] += 1
            done["tokens"] += r.tokens if r.ok else 0
            done["errors"] += not r.ok

    def sample() -> None:
        with lock:
            samples.append({"t_s": time.perf_counter() - t0, "rss_mb": memory_mb(server.pid)["rss"], **done})

    def sampler() -> None:
        while not stop.wait(args.sample_every):
            sample()

    say(f"  soak: {k} clients for {args.soak:g} s, RSS every {args.sample_every:g} s ...")
    sample()
    threading.Thread(target=sampler, daemon=True).start()
    try:
        results = load(server.port, k, args, seconds=args.soak, on_result=count)
    finally:
        stop.set()
    server.wait_idle()
    sample()
    out = summary(results, k, before, scrape(server.port), memory_mb(server.pid))
    del out["per_request"]
    rss = [(s["t_s"], s["rss_mb"]) for s in samples if s["rss_mb"] is not None]
    if rss:
        first, last = rss[0][1], rss[-1][1]
        out["memory"] = {"seconds": args.soak, "samples": samples, "rss_first_mb": first,
                       "rss_max_mb": max(m for _, m in rss), "rss_last_mb": last, "growth_mb": last - first,
                       "slope_mb_per_min": slope(rss) * 60, "grew": last - first > args.grow_mb}
    else:
        out["memory"] = {"seconds": args.soak, "samples": samples}
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of y over x (0 for fewer than two distinct x)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def measure(cmd: list[str], args) -> dict:
    """Start one server, warm it up, run the levels (or the soak), stop it."""
    say(f"starting: {' '.join(cmd)}")
    server = Server(cmd, args.startup_timeout)
    try:
        out = {"command": cmd, "pid": server.pid, "banner": server.banner,
               "rss_mb_ready": memory_mb(server.pid)}
        if args.warmup:
            warm = load(server.port, 1, args, requests=args.warmup)
            bad = [r for r in warm if not r.ok]
            if bad:
                raise RuntimeError(f"the warm-up request failed: {bad[0].error}")
        if args.soak:
            out["soak"] = run_soak(server, args)
        else:
            out["levels"] = run_levels(server, args)
        return out
    finally:
        server.stop()
        out_lines = [line for line in server.log if line.strip() != server.banner]
        if out_lines:  # anything else the server said (warnings, tracebacks)
            say(f"  the server printed {len(out_lines)} more lines; the last:\n    " + "\n    ".join(out_lines[-10:]))


# ------------------------------------------------------------------ the Hugging Face baseline


def hf_server(folder: str, threads: int | None) -> None:
    """Serve ``folder`` (a ``zerotune export --format hf``) with ``transformers``: one ``model.generate`` at a
    time, streamed token by token as the same SSE chunks as ``zerotune serve``. Prints its URL once loaded."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import torch

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.generation.streamers import BaseStreamer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    except Exception as e:
        print(f"error: transformers cannot load {folder}: {type(e).__name__}: {e}", flush=True)
        sys.exit(3)
    if threads:
        torch.set_num_threads(threads)
    bos, eos = model.config.bos_token_id, model.config.eos_token_id
    ends = set(eos) if isinstance(eos, list) else {eos}  # not counted, as zerotune does not count them
    eos = eos[0] if isinstance(eos, list) else eos
    block = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    one_at_a_time = threading.Lock()
    active = collections.Counter()  # requests in progress, for /health (the client waits for 0 between levels)
    counting = threading.Lock()

    class Chunks(BaseStreamer):
        """Writes each new token's text as an SSE chunk (generate passes the prompt first, then each token)."""

        def __init__(self, write) -> None:
            self.write, self.prompt_seen, self.tokens, self.sent = write, False, [], 0

        def put(self, value) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.tokens += [t for t in value.reshape(-1).tolist() if t not in ends]
            text = tok.decode(self.tokens, skip_special_tokens=True)
            end = len(text)
            while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character waits
                end -= 1
            if end > self.sent:
                self.write({"choices": [{"index": 0, "text": text[self.sent:end], "finish_reason": None}]})
                self.sent = end

        def end(self) -> None:
            pass

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each chunk leaves at once

        def log_message(self, *a) -> None:
            pass

        def reply(self, status: int, body: str, kind: str = "application/json") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self.reply(200, json.dumps({"status": "ok", "running": active["n"], "queued": 0}))
            elif self.path == "/metrics":
                self.reply(200, "", "text/plain")
            else:
                self.reply(404, json.dumps({"error": {"message": "not found"}}))

        def do_POST(self) -> None:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            ids = tok(req["prompt"], add_special_tokens=False).input_ids
            ids = [bos, *ids] if bos is not None and bos != eos else ids
            new = int(req.get("max_tokens", 16))
            if block and len(ids) + new > block:
                self.reply(400, json.dumps({"error": {"message": f"{len(ids)} + {new} tokens > context {block}"}}))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def send(text: str) -> None:
                data = text.encode()
                self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def write(event: dict) -> None:
                send(f"data: {json.dumps(event)}\n\n")

            chunks = Chunks(write)
            with counting:
                active["n"] += 1
            try:
                with one_at_a_time, torch.inference_mode():
                    torch.manual_seed(int(req.get("seed", 0)))
                    x = torch.tensor([ids])
                    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=True,
                                   temperature=float(req.get("temperature", 1.0)), top_k=0, top_p=1.0,
                                   pad_token_id=eos if eos is not None else 0, streamer=chunks)
                reason = "length" if len(chunks.tokens) >= new else "stop"
                write({"choices": [{"index": 0, "text": "", "finish_reason": reason}]})
                write({"choices": [], "usage": {"prompt_tokens": len(ids), "completion_tokens": len(chunks.tokens)}})
                send("data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            except Exception as e:
                write({"error": {"message": f"{type(e).__name__}: {e}"}})
            finally:
                with counting:
                    active["n"] -= 1
            self.wfile.write(b"0\r\n\r\n")

    httpd = ThreadingHTTPServer((HOST, 0), Handler)
    httpd.daemon_threads = True
    print(f"serving hf on http://{HOST}:{httpd.server_address[1]}/  ({folder}, one generate at a time)", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=httpd.shutdown).start())
    httpd.serve_forever()


def compare_hf(args) -> dict:
    """The same load against the Hugging Face baseline; {"skipped": why} when it cannot run."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.hf_dir or str(Path(tmp) / "hf")
        if not (Path(folder) / "config.json").is_file():
            say(f"exporting {args.run} to {folder} (zerotune export --format hf) ...")
            done = subprocess.run([sys.executable, "-m", "zerotune", "export", args.run, "--format", "hf", "--out",
                                   folder], cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                return {"skipped": f"zerotune export --format hf failed: {(done.stdout + done.stderr).strip()}"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-server", folder]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        try:
            return measure(cmd, args)
        except ServerFailed as e:  # transformers is missing or cannot load the export
            why = str(e)
            return {"skipped": why[why.find("error: "):] if "error: " in why else why}


# ------------------------------------------------------------------ output


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def fmt(value: float | None, spec: str = ",.1f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def three(s: dict) -> str:
    return " / ".join(fmt(s[p], ".1f", 1000) for p in ("p50", "p95", "p99"))


def level_table(levels: list[dict]) -> list[str]:
    rows = ["| clients | requests | errors | requests/s | tokens/s | vs 1 client | TTFT ms p50 / p95 / p99 | "
            "per token ms p50 / p95 / p99 | chunk gap ms p99 | batch rows | RSS MB peak / now |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        speedup = "–" if lv["speedup"] is None else f"{lv['speedup']:.2f}×"
        rows.append(f"| {lv['clients']} | {lv['requests']} | {lv['errors']} | {fmt(lv['requests_per_s'], '.2f')} | "
                    f"{fmt(lv['tokens_per_s'], ',.0f')} | {speedup} | {three(lv['ttft_s'])} | "
                    f"{three(lv['tpot_s'])} | {fmt(lv['chunk_gap_s']['p99'], '.1f', 1000)} | "
                    f"{fmt(lv['mean_batch_rows'], '.2f')} | {fmt(lv['rss_mb']['peak'], ',.0f')} / "
                    f"{fmt(lv['rss_mb']['rss'], ',.0f')} |")
    return rows


def soak_table(s: dict) -> list[str]:
    m = s["memory"]
    grew = "–" if "grew" not in m else ("yes" if m["grew"] else "no")
    return ["| clients | seconds | requests | errors | requests/s | tokens/s | TTFT ms p50 / p95 / p99 | "
            "per token ms p50 / p95 / p99 | RSS MB first / max / last | last − first MB | MB/min | grew |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
            f"| {s['clients']} | {m['seconds']:g} | {s['requests']} | {s['errors']} | "
            f"{fmt(s['requests_per_s'], '.2f')} | {fmt(s['tokens_per_s'], ',.0f')} | {three(s['ttft_s'])} | "
            f"{three(s['tpot_s'])} | {fmt(m.get('rss_first_mb'), ',.0f')} / {fmt(m.get('rss_max_mb'), ',.0f')} / "
            f"{fmt(m.get('rss_last_mb'), ',.0f')} | {fmt(m.get('growth_mb'), '+.1f')} | "
            f"{fmt(m.get('slope_mb_per_min'), '+.2f')} | {grew} |"]


def report(name: str, result: dict) -> list[str]:
    if "skipped" in result:
        return [f"{name}: skipped: {result['skipped']}"]
    lines = [f"{name}  ({result['banner'].strip()}; RSS when ready {fmt(result['rss_mb_ready']['rss'], ',.0f')} MB)",
             ""]
    lines += soak_table(result["soak"]) if "soak" in result else level_table(result["levels"])
    for lv in [result["soak"]] if "soak" in result else result["levels"]:
        for error, n in lv["error_kinds"]:
            lines.append(f"- {lv['clients']} client{'s' if lv['clients'] > 1 else ''}: {n} × {error}")
    return lines


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def clients_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of client counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be ≥ 1, got {text!r}")
    return values


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="a finished gpt run folder with a tokenizer (e.g. runs/demo/pydoc_gpt)")
    p.add_argument("--clients", type=clients_list, default=[1, 4, 16], help="concurrency levels (default 1,4,16)")
    p.add_argument("--requests", type=int, default=32, help="requests per level, shared by its clients")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--seed", type=int, default=0, help="request i is sampled with seed SEED + i")
    p.add_argument("--timeout", type=float, default=120, help="seconds one request may take (then an error)")
    p.add_argument("--fresh-connections", action="store_true",
                   help="a new TCP connection for every request (default: one keep-alive connection per client)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests before the first level")
    p.add_argument("--max-batch", type=int, default=8, help="passed to zerotune serve")
    p.add_argument("--max-queue", type=int, default=64, help="passed to zerotune serve")
    p.add_argument("--threads", type=int, help="passed to zerotune serve (default: torch's)")
    p.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for /health")
    p.add_argument("--soak", type=float, metavar="SECONDS", help="run the last --clients level this long instead")
    p.add_argument("--sample-every", type=float, default=5, help="soak: seconds between RSS samples")
    p.add_argument("--grow-mb", type=float, default=5, help="soak: last − first RSS above this counts as growth")
    p.add_argument("--compare-hf", action="store_true", help="also run the load against transformers generate")
    p.add_argument("--hf-dir", help="--compare-hf: an existing export to use (default: export to a temp folder)")
    p.add_argument("--json", help="also write everything here")
    p.add_argument("--hf-server", help=argparse.SUPPRESS)  # the baseline's child process
    args = p.parse_args()

    if args.hf_server:
        hf_server(args.hf_server, args.threads)
        return 0
    if args.run is None:
        p.error("the run folder is required")
    if args.requests < 1 or args.max_tokens < 1 or args.timeout <= 0 or (args.soak is not None and args.soak <= 0):
        p.error("--requests, --max-tokens, --timeout and --soak must be positive")
    try:
        meta = read_model_json(open_run(args.run))  # a clear error before anything starts
    except ZerotuneError as e:
        p.error(str(e))
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or kill PID: the server is stopped on the way out
        signal.signal(sig, interrupt)

    m = meta.get("model", {})
    shape = f"soak {args.soak:g} s at {args.clients[-1]} clients" if args.soak else f"{args.requests} requests a level"
    header = [f"machine: {os.cpu_count()} CPUs · {cpu_model()} · Python {platform.python_version()} · "
              f"server threads {args.threads or 'torch default'}",
              f"model: {args.run} ({m.get('arch')}, {m.get('n_layer')} layers, {m.get('n_head')} heads, d_model "
              f"{m.get('d_model')}, block {m.get('block_size')}, vocab {m.get('vocab_size')})",
              f"load: {shape}, max_tokens {args.max_tokens}, temperature 0.8, seeded, streamed; server "
              f"--max-batch {args.max_batch} --max-queue {args.max_queue}"]
    cmd = [sys.executable, "-m", "zerotune", "serve", args.run, "--host", HOST, "--port", "0",
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    results: dict = {"header": header, "settings": {k: v for k, v in vars(args).items() if k != "hf_server"}}
    try:
        results["zerotune"] = measure(cmd, args)
        if args.compare_hf:
            results["hf"] = compare_hf(args)
    except KeyboardInterrupt:
        say("interrupted; the server was stopped")
        return 130
    except RuntimeError as e:
        say(f"error: {e}")
        return 1

    lines = [*header, "", *report("zerotune serve", results["zerotune"])]
    if "hf" in results:
        lines += ["", *report("transformers generate, one request at a time", results["hf"])]
        zt, hf = results["zerotune"].get("levels"), results["hf"].get("levels")
        if zt and hf:
            ratios = {a["clients"]: ratio(a["tokens_per_s"], b["tokens_per_s"]) for a, b in zip(zt, hf, strict=True)}
            results["tokens_per_s_ratio"] = ratios
            lines += ["", "zerotune tokens/s ÷ transformers tokens/s, by clients: "
                      + ", ".join(f"{k}: {fmt(r, '.2f')}×" for k, r in ratios.items())]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
