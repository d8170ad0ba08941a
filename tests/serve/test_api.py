"""The HTTP server, started for real on a free loopback port: the OpenAI endpoints, streaming, the same
tokens alone and in a busy batch, bad requests answered with 400 and the field's name while other
requests go on, keys, the bounded queue, disconnects, metrics, and the official ``openai`` client."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.serve.conftest import Server
from zerotune.generate import generate_text


def post(url: str, body, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if r.headers.get_content_type() == "application/json" else text
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def stream(url: str, body: dict) -> tuple[str, list[dict]]:
    """The text of a streamed request's first choice and all its chunks."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    chunks, text = [], ""
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers.get_content_type() == "text/event-stream"
        for line in r:
            line = line.decode().strip()
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                return text, chunks
            c = json.loads(line[6:])
            chunks.append(c)
            for ch in c["choices"]:
                text += ch.get("text") or ch.get("delta", {}).get("content") or ""
    raise AssertionError("the stream ended without data: [DONE]")


def test_models_health_and_the_chat_page(server):
    status, body = get(server.url + "/v1/models")
    assert status == 200 and body["object"] == "list" and body["data"][0]["id"] == "run"
    assert get(server.url + "/health") == (200, {"status": "ok", "model": "run", "running": 0, "queued": 0})
    status, page = get(server.url + "/")
    assert status == 200 and "<html" in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|https?://""", page)  # nothing from elsewhere


def test_a_completion_is_what_zerotune_generate_gives(server, text_run):
    status, body = post(server.url + "/v1/completions",
                        {"model": "run", "prompt": "The with statement", "max_tokens": 30, "temperature": 0})
    assert status == 200
    want = generate_text(text_run, ["The with statement"], max_new_tokens=30, temperature=0)[0]
    (choice,) = body["choices"]
    assert choice["text"] == want and choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["usage"] == {"prompt_tokens": 19, "completion_tokens": 30, "total_tokens": 49}  # 18 chars + BOS


def requests_mix():
    out = []
    for i, prompt in enumerate(["The with statement", "A class", "x", "Comparisons", "assert", "The import"]):
        out.append(("/v1/completions", {"prompt": prompt, "max_tokens": 15 + 10 * i, "temperature": 0}))
        out.append(("/v1/completions", {"prompt": prompt, "max_tokens": 60 - 5 * i, "temperature": 1.0,
                                        "top_p": 0.9, "seed": 100 + i}))
        out.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 25,
                                             "temperature": 0.7, "seed": i}))
    return out


def test_concurrent_streams_get_exactly_what_each_gets_alone(server):
    mix = requests_mix()
    alone = [stream(server.url + path, body)[0] for path, body in mix]
    assert len(set(alone)) > len(mix) // 2
    together: list[str | None] = [None] * len(mix)

    def one(i):
        together[i] = stream(server.url + mix[i][0], mix[i][1])[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(mix))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
    # and non-streaming gives the same text as streaming
    status, body = post(server.url + mix[1][0], mix[1][1])
    assert status == 200 and body["choices"][0]["text"] == alone[1]


def test_a_stream_ends_with_a_finish_reason_usage_and_done(server):
    text, chunks = stream(server.url + "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0,
                           "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "chat.completion.chunk" for c in chunks)
    assert text


def test_n_choices_stop_strings_and_logprobs(server):
    status, body = post(server.url + "/v1/completions", {"prompt": "The", "max_tokens": 40, "temperature": 1.0,
                                                         "seed": 3, "n": 3, "logprobs": 2})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in body["choices"]]
    assert len(set(texts)) == 3  # choice j is sampled with seed + j
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 40 and "".join(lp["tokens"]) == texts[0]
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(t) == 2 for t in lp["top_logprobs"])
    text, chunks = stream(server.url + "/v1/completions", {"prompt": "The", "max_tokens": 40, "temperature": 1.0,
                                                          "seed": 3, "logprobs": 2})
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert text == texts[0]  # the same sample streamed
    assert sum((x["text_offset"] for x in streamed), []) == lp["text_offset"]  # offsets run across chunks
    stop = texts[0][5:8]
    status, cut = post(server.url + "/v1/completions", {"prompt": "The", "max_tokens": 40, "temperature": 1.0,
                                                        "seed": 3, "stop": [stop]})
    assert cut["choices"][0]["text"] == texts[0][:texts[0].index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    status, chat = post(server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                        "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3})
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert content[0]["top_logprobs"][0]["logprob"] >= content[0]["logprob"] - 1e-6  # greedy picks the top


BAD = [
    ("not JSON", "/v1/completions", b'{"prompt": "x",', None, "not valid JSON"),
    ("not an object", "/v1/completions", b'["x"]', None, "must be a JSON object"),
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "10"}, "max_tokens", "valid integer"),
    ("unknown field", "/v1/completions", {"prompt": "x", "temprature": 0}, "temprature", "did you mean 'temperature'"),
    ("no prompt", "/v1/completions", {"max_tokens": 3}, "prompt", "required"),
    ("prompt type", "/v1/completions", {"prompt": 5}, "prompt", "a string, a list of strings"),
    ("max_tokens beyond the context", "/v1/completions", {"prompt": "x", "max_tokens": 1000}, "max_tokens",
     "context is 96 tokens"),
    ("prompt longer than the block", "/v1/completions", {"prompt": "y" * 200}, "prompt", "the prompt is 201 tokens"),
    ("NaN temperature", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature", "finite"),
    ("negative temperature", "/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature",
     "greater than or equal to 0"),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [1, 99999]}, "prompt", "token ids"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, "messages", "at least 1 item"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role",
     "'user'"),
    ("misspelt message key", "/v1/chat/completions", {"messages": [{"role": "user", "contnt": "x"}]},
     "messages.0.contnt", "did you mean 'content'"),
    ("top_logprobs alone", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                    "top_logprobs": 2}, "top_logprobs", "logprobs: true"),
    ("another model", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, "model", "not served here"),
    ("too many stops", "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ("body over the limit", "/v1/completions", {"prompt": "x" * (1 << 20)}, None, "limit"),
]


@pytest.mark.parametrize("name,path,body,param,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_is_a_400_naming_the_field(server, name, path, body, param, message):
    raw = body if isinstance(body, bytes) else None
    status, answer = post(server.url + path, body, raw=raw)
    assert status == 400, answer
    err = answer["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and message in err["message"], err


def test_bad_requests_under_load_do_not_disturb_a_stream(server):
    body = {"prompt": "The with statement", "max_tokens": 70, "temperature": 1.0, "seed": 9}
    alone = stream(server.url + "/v1/completions", body)[0]
    got = []
    t = threading.Thread(target=lambda: got.append(stream(server.url + "/v1/completions", body)[0]))
    t.start()
    for _, path, bad, _, _ in BAD * 2:
        status, _ = post(server.url + path, bad, raw=bad if isinstance(bad, bytes) else None)
        assert status == 400
    t.join(120)
    assert got == [alone]
    assert get(server.url + "/health")[0] == 200


def test_unknown_paths_and_methods_get_openai_style_errors(server):
    status, body = get(server.url + "/v1/engines")
    assert status == 404 and "no such endpoint" in body["error"]["message"]
    status, body = get(server.url + "/v1/completions")
    assert status == 405 and body["error"]["message"].startswith("GET /v1/completions")


def test_metrics_count_requests_tokens_and_latency(server):
    post(server.url + "/v1/completions", {"prompt": "x", "max_tokens": 7, "temperature": 0})
    status, text = get(server.url + "/metrics")
    assert status == 200
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['zerotune_requests_total{endpoint="completions",status="200"}'] >= 1
    assert values["zerotune_generation_tokens_total"] >= 7
    assert values["zerotune_time_to_first_token_seconds_count"] >= 1
    assert values['zerotune_batch_rows_bucket{le="+Inf"}'] == values["zerotune_batch_rows_count"] > 0
    assert values["zerotune_queue_length"] == 0


def test_the_official_openai_client_works_against_it(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["run"]
    done = client.completions.create(model="run", prompt="The with statement", max_tokens=20, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 20
    parts = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=20, temperature=0, seed=1, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    whole = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=20, temperature=0, seed=1)
    assert streamed == whole.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="run", prompt="x", max_tokens=5000)


def test_a_key_is_required_when_set(text_run):
    s = Server(text_run, "--api-key", "s3cret")
    try:
        body = {"prompt": "x", "max_tokens": 2}
        status, answer = post(s.url + "/v1/completions", body)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert post(s.url + "/v1/completions", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert post(s.url + "/v1/completions", body, {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(s.url + "/health")[0] == 200  # health and the page stay open
    finally:
        s.stop()


def test_a_full_queue_answers_429_and_a_dropped_stream_frees_its_row(slow):
    s = Server(slow, "--max-batch", "1", "--max-queue", "2")
    try:
        status, answer = post(s.url + "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 4})
        assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"  # 4 asked: 1 row + 2 places
        assert post(s.url + "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 3})[0] == 200
        # a long stream, dropped after its first chunk
        conn = http.client.HTTPConnection(s.url.removeprefix("http://"), timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 500, "stream": True,
                                                            "temperature": 0}), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        conn.close()
        end = time.monotonic() + 30
        while get(s.url + "/health")[1]["running"] and time.monotonic() < end:
            time.sleep(0.05)
        assert get(s.url + "/health")[1]["running"] == 0
        _, text = get(s.url + "/metrics")
        tokens = next(float(x.split()[1]) for x in text.splitlines() if x.startswith("zerotune_generation_tokens"))
        assert tokens < 500  # it stopped early: the row was freed, not run to the end
        assert 'zerotune_sequences_total{reason="cancelled"} 1' in text
    finally:
        s.stop()
