"""Every decoder run zerotune generates with is served the same way: an instruction-tuned LoRA run
(base + adapter, chat template) and an int8 run; `zerotune chat` through a pipe; the loading state;
and the command line's refusals (exit 2, one line)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import pytest

from tests.serve.conftest import ROOT, Server
from tests.serve.test_api import post
from zerotune.generate import generate, generate_text, load_decoder

ROWS = [{"instruction": "hello", "output": "world"}, {"instruction": "abc", "output": "def"},
        {"instruction": "name a loop", "output": "for"}]


@pytest.fixture(scope="module")
def sft_lora_run(text_run, tmp_path_factory):
    from zerotune.finetune.api import finetune

    tmp = tmp_path_factory.mktemp("sft")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    cfg = {"seed": 0, "task": "sft", "data": {"train": f"jsonl:{data}", "val_split": 0.0},
           "sft": {"max_length": 32},
           "finetune": {"lora": {"r": 8, "alpha": 16, "targets": ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]}},
           "optim": {"name": "adamw", "lr": 0.005},
           "train": {"epochs": None, "max_steps": 300, "batch_size": 4, "progress": False, "metrics": []}}
    return finetune(cfg, text_run, method="lora", out=tmp / "run", log=lambda *a: None)


def test_an_instruction_tuned_lora_run_chats_through_its_template(sft_lora_run):
    meta = json.loads((sft_lora_run / "model.json").read_text())
    assert meta["method"] == "lora" and (sft_lora_run / "chat_template.json").is_file()
    s = Server(sft_lora_run)
    try:
        for row in ROWS:
            status, body = post(s.url + "/v1/chat/completions", {"messages": [{"role": "user", "content":
                                row["instruction"]}], "temperature": 0, "max_tokens": 20})
            assert status == 200
            want = generate_text(sft_lora_run, [row["instruction"]], max_new_tokens=20, temperature=0)[0]
            assert body["choices"][0]["message"]["content"] == want == row["output"]
            assert body["choices"][0]["finish_reason"] == "stop"  # at the template's end marker
    finally:
        s.stop()


def test_an_int8_run_serves_what_it_generates(text_run, tmp_path):
    from zerotune.compress.api import quantize

    q = quantize(text_run, out=tmp_path / "q", log=lambda *a: None)
    s = Server(q)
    try:
        status, body = post(s.url + "/v1/completions", {"prompt": "The for", "max_tokens": 25, "temperature": 0})
        assert status == 200
        assert body["choices"][0]["text"] == generate_text(q, ["The for"], max_new_tokens=25, temperature=0)[0]
    finally:
        s.stop()


def zerotune(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zerotune", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_chat_through_a_pipe_keeps_the_history_and_resets(sft_lora_run):
    done = zerotune("chat", str(sft_lora_run), "--temperature", "0", "--max-new-tokens", "10",
                    stdin="hello\nabc\n/reset\nname a loop\n/exit\nnever read\n")
    assert done.returncode == 0, done.stderr
    dec = load_decoder(sft_lora_run)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
               {"role": "user", "content": "abc"}]
    second = dec.decode(generate(dec.model, [dec.encode_chat(history)], 10, temperature=0, eos_id=dec.eos_id)[0])
    # turn two answers the whole history; after /reset the model sees the new turn alone
    assert done.stdout.splitlines() == ["world", second, "(new conversation)", "for"]


def test_each_chat_reply_answers_the_whole_history(sft_lora_run):
    """Turn two of `zerotune chat` is what the model generates after the three-message history."""
    from zerotune.serve.api import chat

    class Pipe:
        def __init__(self, lines):
            self.lines = lines

        def readline(self):
            return self.lines.pop(0) if self.lines else ""

        def isatty(self):
            return False

    out = io.StringIO()
    history = chat(sft_lora_run, temperature=0, max_new_tokens=10, stdin=Pipe(["abc\n", "hello\n"]), stdout=out)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    dec = load_decoder(sft_lora_run)
    ids = dec.encode_chat(history[:3])
    want = dec.decode(generate(dec.model, [ids], 10, temperature=0, eos_id=dec.eos_id)[0])
    assert history[3]["content"] == want


def test_health_says_loading_until_the_model_is_ready(text_run):
    from starlette.testclient import TestClient

    from zerotune.serve.app import State, create_app

    release = threading.Event()

    def load():
        release.wait(30)
        return load_decoder(text_run)

    state = State(load, "m", max_batch=2, max_queue=4, api_key=None)
    with TestClient(create_app(state)) as client:
        assert client.get("/health").status_code == 503 and client.get("/health").json() == {"status": "loading"}
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        state.ready.wait(30)
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_model_that_fails_to_load_is_reported(text_run):
    from starlette.testclient import TestClient

    from zerotune.errors import ZerotuneError
    from zerotune.serve.app import State, create_app

    def load():
        raise ZerotuneError("model.safetensors: the file is damaged")

    state = State(load, "m", max_batch=2, max_queue=4, api_key=None)
    with TestClient(create_app(state)) as client:
        state.ready.wait(30)
        assert client.get("/health").json() == {"status": "error", "message": "model.safetensors: the file is damaged"}
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 503


@pytest.mark.parametrize("args,message", [
    (["serve", "{missing}"], "run folder not found"),
    (["serve", "{classifier}"], "is not a decoder; serve needs gpt"),
    (["serve", "{run}", "--port", "70000"], "--port"),
    (["serve", "{run}", "--max-batch", "0"], "--max-batch"),
    (["chat", "{missing}"], "run folder not found"),
    (["chat", "{run}", "--temperature", "-1"], "temperature"),
    (["chat", "{run}", "--top-p", "0"], "top_p"),
])
def test_bad_command_lines_exit_2_with_one_line(text_run, tmp_path, args, message):
    classifier = tmp_path / "clf"
    if "{classifier}" in args:
        from zerotune.train.api import train

        train({"seed": 0, "task": "classification", "data": {"train": "builtin:digits"},
               "model": {"arch": "mlp", "hidden": [8]}, "train": {"epochs": 1, "progress": False}},
              out=classifier, log=lambda *a: None)
    filled = [a.format(missing=tmp_path / "nope", run=text_run, classifier=classifier) for a in args]
    done = zerotune(*filled, stdin="")
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_a_port_in_use_is_one_line_and_exit_2(server, text_run):
    port = server.url.rsplit(":", 1)[1]
    done = zerotune("serve", str(text_run), "--port", port)
    assert done.returncode == 2
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in done.stderr.strip().splitlines()[-1]
    assert len(done.stderr.strip().splitlines()) == 1


def test_damaged_weights_stop_the_server_with_exit_2(text_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(text_run, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    done = zerotune("serve", str(broken), "--port", "0", timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout.startswith("serving broken on http://127.0.0.1:")  # it listened, then the load failed
    assert "model.safetensors" in done.stderr.strip().splitlines()[-1]
