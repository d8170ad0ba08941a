"""The README's picture of the chat page: serve a run, hold a short conversation in headless Chromium,
save a screenshot.

    python bench/chat_screenshot.py runs/gpt_sft --out docs/chat_page.png \\
        --prompt "Explain the Python topic with." --prompt "Explain the Python topic for."

It starts ``zerotune serve RUN --port 0`` itself (loopback), opens the page in Debian's ``chromium``
through ``chromedriver`` (Selenium), sends each prompt at temperature 0 and waits for the streamed
reply, then saves the window as PNG and stops the server.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a decoder run folder (an instruction-tuned one reads best)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "chat_page.png"))
    ap.add_argument("--prompt", action="append", help="a user turn (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=40, help="per reply (the history must fit the context)")
    args = ap.parse_args()
    prompts = args.prompt or ["Explain the Python topic with."]

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = subprocess.Popen([sys.executable, "-m", "zerotune", "serve", args.run, "--port", "0"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    browser = None
    try:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", server.stdout.readline())
        if not found:
            raise SystemExit("the server did not start")
        url = f"http://127.0.0.1:{found.group(1)}"
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if b'"ok"' in r.read():
                        break
            except OSError:
                time.sleep(0.1)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,720"):
            options.add_argument(arg)
        browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        browser.get(url + "/")
        wait = WebDriverWait(browser, 300, poll_frequency=0.05)
        wait.until(lambda d: d.find_element(By.ID, "model").text)
        for name, value in (("temperature", "0"), ("max-tokens", str(args.max_tokens))):
            box = browser.find_element(By.ID, name)
            box.clear()
            box.send_keys(value)
        for i, prompt in enumerate(prompts):
            browser.find_element(By.ID, "prompt").send_keys(prompt)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda d, n=i + 1: len(d.find_elements(By.CSS_SELECTOR, '.assistant[data-done="true"]')) == n
                       or d.find_element(By.ID, "error").text)
            problem = browser.find_element(By.ID, "error").text
            if problem:  # e.g. the history no longer fits the model's context
                raise SystemExit(f"turn {i + 1}: the page shows an error: {problem}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(args.out)
        print(f"saved {args.out}")
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
