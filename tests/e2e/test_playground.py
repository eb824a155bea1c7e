"""The chat playground at GET /, in a real browser: Debian's headless Chromium driven by Playwright,
against the real SmolLM2-135M-Instruct server (the embedded default, as `make run` serves it) with an
API key.

The oracle for the streamed answer is the server's own non-streamed /v1/chat/completions with the same
messages and greedy sampling, sent here without the page."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import requests
from server_helpers import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("CI"):  # CI installs it (Makefile: browser); a run without it must not pass silently
        raise RuntimeError("Chromium is missing: `make browser` installs Debian's package")
    pytest.skip("needs Chromium (apt-get install chromium, or `make browser`)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow
KEY = "playground-secret"
SYSTEM = "You answer briefly."


@pytest.fixture(scope="module")
def server(hf_home, smollm2_gguf, smollm2_tokenizer_dir):
    with running_server(str(smollm2_gguf), hf_home, "--api-key", KEY, "--max-batch-prefill-tokens", "512") as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_the_page_streams_a_chat_answer_with_its_speed_and_needs_the_api_key(server, browser, tmp_path):
    page = browser.new_page()
    requests_sent = []
    page.on("request", lambda r: requests_sent.append(r.post_data) if r.url.endswith("/v1/chat/completions") else None)
    response = page.goto(server.url + "/")
    assert response.status == 200 and response.headers["content-type"].startswith("text/html")
    page.wait_for_function("document.getElementById('facts').textContent.includes('max input')")
    assert page.locator("#api-key").is_visible()  # the server has a key: the page asks for it

    page.fill("#system", SYSTEM)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "6")
    page.fill("#prompt", "Hello there")
    page.press("#prompt", "Enter")  # no key yet: the server's 401 shows as an error, nothing is kept
    error = page.locator(".assistant.error")
    error.wait_for()
    assert "401" in error.text_content()

    page.fill("#api-key", KEY)
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "Hello there")
    page.press("#prompt", "Enter")
    # streamed: text shows while the answer is still coming (the Stop button is up)
    page.wait_for_function("""() => {
        const answer = document.querySelector('.assistant:not(.error)');
        return answer && answer.textContent.length > 0 && !document.getElementById('stop').hidden;
    }""", timeout=60_000)
    stats = page.locator(".assistant:not(.error) .stats")
    stats.wait_for(timeout=120_000)
    assert "TTFT" in stats.text_content() and "tokens/s" in stats.text_content() and " tokens" in stats.text_content()
    answer = page.locator(".assistant:not(.error)").evaluate("node => node.firstChild.textContent")

    expected = requests.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "tgi", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}],
        "max_tokens": 24, "temperature": 0}, timeout=120).json()
    assert answer == expected["choices"][0]["message"]["content"] and len(answer) > 10
    sent = json.loads(requests_sent[-1])
    assert sent["stream"] is True and sent["messages"][0] == {"role": "system", "content": SYSTEM}
    assert "response_format" not in sent

    # the JSON-schema box constrains the next answer; the conversation so far goes with it
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    page.fill("#schema", json.dumps(schema))
    page.fill("#prompt", "Where?")
    page.keyboard.press("Enter")
    page.locator(".assistant:not(.error) .stats").nth(1).wait_for(timeout=120_000)
    sent = json.loads(requests_sent[-1])
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert sent["messages"][2]["content"] == answer
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.close()


def test_on_a_phone_the_settings_stack_above_the_chat(server, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(server.url + "/")
    settings, chat = page.locator("#settings").bounding_box(), page.locator("#chat").bounding_box()
    assert settings["y"] + settings["height"] <= chat["y"] and chat["width"] <= 390
    page.close()


def test_the_start_logs_weight_loading_progress_warmup_and_where_to_point_a_browser(server):
    log = server.log
    steps = [int(percent) for percent in re.findall(r"loading weights: +(\d+)% \(\d+ of \d+ tensors", log)]
    assert len(steps) >= 5 and steps == sorted(steps) and steps[-1] == 100  # a line every tenth or so
    assert "loading weights: done," in log
    assert "warmup steps (" in log and "KV cache:" in log
    url = f"http://127.0.0.1:{server.port}"
    assert f"serving on {url}: open {url}/ in a browser for the chat playground; TGI clients take {url}, " \
           f"OpenAI clients {url}/v1" in log
