"""The chat page (GET /) in a real headless Chromium: it names the model, streams the same reply the API gives,
sends the whole history, stops a stream and keeps what arrived, and shows the server's errors.

The last test takes a screenshot of a conversation (the README's picture is made the same way by
``bench/chat_screenshot.py`` from a real instruction-tuned run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("selenium")

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests.serve.conftest import Server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PROMPT = "The with statement"
DONE = '.assistant[data-done="true"]'


def ensure_chromium() -> None:
    """Install Chromium and its driver with apt-get when they are missing and we may; else skip."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if getattr(os, "geteuid", lambda: -1)() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            for cmd in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
                subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing and apt-get could not install them: {e}")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"the browser test needs {CHROMIUM} and {CHROMEDRIVER} "
                    "(apt-get install chromium chromium-driver, as root)")


@pytest.fixture(scope="module")
def browser():
    ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def model(server) -> dict:
    with urllib.request.urlopen(server.url + "/v1/models", timeout=60) as r:
        return json.load(r)["data"][0]


@pytest.fixture
def page(browser, server, model):
    """The chat page, freshly loaded (an empty conversation), once it shows the model's name."""
    browser.get(server.url + "/")
    wait(browser).until(lambda d: d.find_element(By.ID, "model").text == model["id"])
    return browser


def wait(driver, timeout: float = 120) -> WebDriverWait:
    return WebDriverWait(driver, timeout, poll_frequency=0.05)


def chat_api(server, body: dict) -> tuple[int, dict]:
    """POST /v1/chat/completions directly: the status and the JSON body."""
    request = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def settings(page, temperature: float, max_tokens: int, seed: int | None = None) -> None:
    for field, value in (("temperature", temperature), ("max-tokens", max_tokens), ("seed", seed)):
        box = page.find_element(By.ID, field)
        box.clear()
        if value is not None:
            box.send_keys(str(value))


def say(page, text: str) -> None:
    """Type a message and send it; then wait until its reply is done."""
    done = len(page.find_elements(By.CSS_SELECTOR, DONE))
    page.find_element(By.ID, "prompt").send_keys(text)
    page.find_element(By.ID, "send").click()
    wait(page).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, DONE)) > done)


def text(element) -> str:
    """The exact text (``.text`` would trim it and fold its spaces)."""
    return element.get_property("textContent")


def reply(server, messages: list[dict], **fields) -> dict:
    status, body = chat_api(server, {"messages": messages, **fields})
    assert status == 200, body
    return body["choices"][0]


def test_header_names_the_model_and_max_tokens_fits_its_context(page, model):
    assert page.find_element(By.ID, "model").text == model["id"]
    assert page.find_element(By.ID, "max-tokens").get_property("value") == str(min(200, model["max_model_len"] // 2))
    assert page.find_element(By.ID, "temperature").get_property("value") == "0.8"
    assert page.find_element(By.ID, "error").text == ""


def test_reply_is_the_api_reply(page, server):
    settings(page, temperature=0, max_tokens=30, seed=0)
    say(page, PROMPT)
    [element] = page.find_elements(By.CSS_SELECTOR, ".assistant")
    expected = reply(server, [{"role": "user", "content": PROMPT}], max_tokens=30, temperature=0, seed=0)
    assert text(element) == expected["message"]["content"]
    assert element.get_attribute("data-finish-reason") == expected["finish_reason"]
    assert [text(e) for e in page.find_elements(By.CSS_SELECTOR, ".user")] == [PROMPT]


def test_second_turn_sends_the_history(page, server):
    settings(page, temperature=0, max_tokens=30, seed=0)
    say(page, PROMPT)
    first = text(page.find_element(By.CSS_SELECTOR, ".assistant"))
    # The history fills 88 of the context's 96 tokens (the plain chat format around 18 + 30 + 3 characters).
    settings(page, temperature=0, max_tokens=4, seed=0)
    say(page, "for")
    history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first},
               {"role": "user", "content": "for"}]
    expected = reply(server, history, max_tokens=4, temperature=0, seed=0)
    assert [text(e) for e in page.find_elements(By.CSS_SELECTOR, ".assistant")] == [first,
                                                                                      expected["message"]["content"]]


def test_enter_sends_and_shift_enter_breaks_the_line(page):
    box = page.find_element(By.ID, "prompt")
    box.send_keys("a", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "b")
    assert box.get_property("value") == "a\nb"
    assert page.find_elements(By.CSS_SELECTOR, ".message") == []
    box.send_keys(Keys.ENTER)
    wait(page).until(lambda d: d.find_elements(By.CSS_SELECTOR, DONE))
    assert [text(e) for e in page.find_elements(By.CSS_SELECTOR, ".user")] == ["a\nb"]
    assert box.get_property("value") == ""


def test_stop_keeps_the_partial_reply_and_frees_the_slot(page, server, model):
    max_tokens = model["max_model_len"] - 30  # the prompt "with" is ~22 tokens of the template
    full = reply(server, [{"role": "user", "content": "with"}], max_tokens=max_tokens, temperature=0, seed=0)
    assert full["finish_reason"] == "length", full  # a long reply, so that there is something to stop
    settings(page, temperature=0, max_tokens=max_tokens, seed=0)
    # The tiny model writes the whole reply in well under a second; a slow network keeps the page reading it.
    page.set_network_conditions(offline=False, latency=0, download_throughput=1500, upload_throughput=1 << 20)
    try:
        page.find_element(By.ID, "prompt").send_keys("with")
        page.find_element(By.ID, "send").click()
        element = page.find_element(By.CSS_SELECTOR, ".assistant")
        wait(page).until(lambda d: text(element))
        page.find_element(By.ID, "stop").click()
        wait(page).until(lambda d: element.get_attribute("data-done") == "true")
    finally:
        page.delete_network_conditions()
    partial = text(element)
    assert partial and len(partial) < len(full["message"]["content"])
    assert full["message"]["content"].startswith(partial)
    assert element.get_attribute("data-finish-reason") == "cancelled"
    assert page.find_element(By.ID, "send").is_enabled() and not page.find_element(By.ID, "stop").is_enabled()

    def running() -> int:
        with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
            return json.load(r)["running"]

    wait(page, 30).until(lambda d: running() == 0)


def test_server_error_is_shown(page, server):
    settings(page, temperature=0, max_tokens=100_000)
    page.find_element(By.ID, "prompt").send_keys(PROMPT)
    page.find_element(By.ID, "send").click()
    status, body = chat_api(server, {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 100_000,
                                     "temperature": 0})
    assert status == 400
    wait(page).until(lambda d: d.find_element(By.ID, "error").text)
    assert page.find_element(By.ID, "error").text == body["error"]["message"]
    # The refused turn is taken back, its text left in the box to change and send again.
    assert page.find_elements(By.CSS_SELECTOR, ".message") == []
    assert page.find_element(By.ID, "prompt").get_property("value") == PROMPT


def test_api_key_is_asked_for_kept_and_sent(browser, text_run, model):
    keyed = Server(text_run, "--api-key", "sesame", "--threads", "1")
    try:
        browser.get(keyed.url + "/")
        wait(browser).until(lambda d: "API key" in d.find_element(By.ID, "error").text)  # the server's 401
        browser.find_element(By.ID, "api-key").send_keys("sesame", Keys.TAB)
        wait(browser).until(lambda d: d.find_element(By.ID, "model").text == model["id"])
        assert browser.find_element(By.ID, "error").text == ""
        assert browser.execute_script("return localStorage.getItem('zerotune-api-key')") == "sesame"
        settings(browser, temperature=0, max_tokens=5)
        say(browser, PROMPT)
        assert browser.find_element(By.CSS_SELECTOR, DONE).get_attribute("data-finish-reason") == "length"
        assert browser.find_element(By.ID, "error").text == ""
    finally:
        keyed.stop()


def test_screenshot_of_a_conversation(page, tmp_path):
    settings(page, temperature=0.8, max_tokens=30, seed=0)
    say(page, PROMPT)
    settings(page, temperature=0.8, max_tokens=4, seed=0)
    say(page, "for")
    page.find_element(By.ID, "prompt").send_keys("Tell me about the for statement")
    shot = tmp_path / "chat_page.png"
    assert page.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
