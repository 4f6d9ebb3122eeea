"""The web chat page (nanochat/serve/static/index.html) in a real headless Chromium.

The browser drives the real app over real HTTP: a stand-in model with a known script checks that
replies stream in exactly (multi-byte characters included), that every turn is sent back to the
server, and that stop, regenerate, new chat and the API-key error work; an untrained GPT checks the
whole path with a real model. The page's SSE reader is also fed a stream cut at awkward places —
inside `data:` lines, between the two newlines that end an event, inside UTF-8 characters — both
from a test server and, for every possible cut, from a stream made in the page itself.

Needs Debian's chromium and chromium-driver; without them the tests skip (and fail under CI).
Waits are WebDriverWait conditions, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from torch import nn

from nanochat.chat_format import render_for_completion
from nanochat.config import ModelSource
from nanochat.engine import Engine, load_engine
from nanochat.runtime import init_runtime
from nanochat.serve.app import create_app
from nanochat.tokenizer import Tokenizer
from tests._chat_model import TEXT, make_chat_model, new_prompts, scripted_slot_cache
from tests._server import serving

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PAGE = Path(__file__).resolve().parents[1] / "nanochat" / "serve" / "static" / "index.html"
WAIT_S = 30  # upper bound for any one condition; the tests never sleep for a fixed time


# ---------------------------------------------------------------------------------------------
# The browser


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    message = ""
    if missing:
        message = (f"{' and '.join(missing)} not found: `apt-get install chromium chromium-driver` "
                   "to run the web UI tests")
    elif importlib.util.find_spec("selenium") is None:
        message = "selenium is not installed: `uv sync` (it is a dev dependency) to run the web UI tests"
    if message:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def driver():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM  # with the driver's path below, selenium-manager never runs
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,850"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    browser.set_script_timeout(WAIT_S)
    try:
        yield browser
    finally:
        browser.quit()


def wait(driver, condition, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition, message)


# ---------------------------------------------------------------------------------------------
# The SSE reader, fed awkwardly cut streams

def _chunk(content: str | None = None, finish: str | None = None) -> dict:
    delta = {} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


PIECES = ["Hel", "lo, wörld", " — 日本語 ✓", "\n\nline two 🙂", ""]
EVENTS = [json.dumps(_chunk(p), ensure_ascii=False) for p in PIECES] + [json.dumps(_chunk(finish="stop")), "[DONE]"]
# What a server may send besides `data:`: a comment, an `event:` field, a data field split over two lines.
STREAM = ": keep-alive\n\n" + "".join(f"data: {e}\n\n" for e in EVENTS[:3]) + "event: message\ndata:" + \
    EVENTS[3] + "\n\n" + "".join(f"data: {e}\n\n" for e in EVENTS[4:]) + "data: multi\ndata: line\n\n"
EXPECTED_DATA = [*EVENTS, "multi\nline"]


def _awkward_cuts(body: bytes) -> list[bytes]:
    """`body` cut inside `data:`, inside the separator between events, and inside multi-byte
    characters (é: 2 bytes, 日: 3 bytes, 🙂: 4 bytes), plus a run of single bytes."""
    cuts = {body.index(b"data:") + 2, body.index(b"\n\n", 20) + 1}
    for char in "ö日🙂":
        at = body.index(char.encode())
        cuts |= {at + 1, at + len(char.encode()) - 1}
    start = body.index("語".encode()) - 2
    cuts |= set(range(start, start + 8))
    points = [0, *sorted(cuts), len(body)]
    return [body[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def _sse_test_app(chunks: list[bytes]) -> FastAPI:
    app = FastAPI()
    app.get("/")(lambda: FileResponse(PAGE))
    app.get("/v1/models")(lambda: {"data": [{"id": "sse-test"}]})

    @app.get("/awkward")
    async def awkward():
        async def body():
            for chunk in chunks:
                yield chunk
                await asyncio.sleep(0.01)  # let each piece leave as its own network write
        return StreamingResponse(body(), media_type="text/event-stream")

    return app


READ_URL = """
const [url, done] = arguments;
const data = [];
nanochat.readEventStream(await fetch(url), (d) => data.push(d))
  .then((reads) => done({data, reads}), (e) => done({error: String(e)}));
"""


def test_sse_reader_reassembles_events_cut_across_network_reads(driver):
    chunks = _awkward_cuts(STREAM.encode())
    assert len(chunks) > 10 and any(_splits_a_char(c) for c in chunks)
    with serving(_sse_test_app(chunks)) as base:
        driver.get(base)
        wait(driver, lambda d: d.execute_script("return !!window.nanochat"), "page script did not load")
        got = driver.execute_async_script("(async () => {" + READ_URL + "})()", f"{base}/awkward")
    assert "error" not in got, got
    assert got["reads"] > 1  # it really did arrive in pieces
    assert got["data"] == EXPECTED_DATA
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in got["data"][:-2])
    assert text == "".join(PIECES)


def _splits_a_char(chunk: bytes) -> bool:
    try:
        chunk.decode()
        return False
    except UnicodeDecodeError:
        return True


EVERY_CUT = """
const [text, done] = arguments;
const bytes = new TextEncoder().encode(text);
// A body whose reads are exactly these pieces: no network in the way.
const body = (pieces) => ({
  body: new ReadableStream({ start(c) { pieces.forEach((p) => c.enqueue(p)); c.close(); } }),
});
const read = async (pieces) => {
  const data = [];
  const reads = await nanochat.readEventStream(body(pieces), (d) => data.push(d));
  return { data, reads };
};
(async () => {
  const results = [];
  for (let i = 1; i < bytes.length; i++) results.push(await read([bytes.slice(0, i), bytes.slice(i)]));
  const bytewise = await read(Array.from(bytes, (b) => Uint8Array.of(b)));
  done({ results, bytewise });
})().catch((e) => done({ error: String(e) }));
"""


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_sse_reader_handles_every_cut_point_and_line_ending(driver, newline):
    with serving(_sse_test_app([])) as base:
        driver.get(base)
        wait(driver, lambda d: d.execute_script("return !!window.nanochat"), "page script did not load")
        got = driver.execute_async_script(EVERY_CUT, STREAM.replace("\n", newline))
    assert "error" not in got, got
    n = len(STREAM.replace("\n", newline).encode())
    assert len(got["results"]) == n - 1
    for cut, result in enumerate(got["results"], 1):
        assert result == {"data": EXPECTED_DATA, "reads": 2}, f"cut after byte {cut}"
    assert got["bytewise"] == {"data": EXPECTED_DATA, "reads": n}


# ---------------------------------------------------------------------------------------------
# The page against the real app


class ScriptedChat(nn.Module):
    """A stand-in GPT: request n is answered with replies[n] token by token (the last reply for any
    later request), so the text the page must show is known. It records each request's prompt, and
    request n may hold after writing holds[n] tokens until the test calls release(n)."""

    def __init__(self, tok, replies: list[list[int]], holds: dict[int, int] | None = None):
        super().__init__()
        self.max_positions = 1024  # the engine reads the context length here
        self.vocab, self.replies, self.holds = tok.vocab_size, replies, holds or {}
        self.prompts: list[list[int]] = []
        self.pos = 0
        self._released = {n: threading.Event() for n in self.holds}

    def release(self, n: int) -> None:
        self._released[n].set()

    def new_kv_cache(self, batch, max_len, pad=None, dtype=None):
        return None

    new_slot_cache = staticmethod(scripted_slot_cache)

    def forward(self, idx, kv_cache=None, logits_at=None):
        for prompt in new_prompts(idx, kv_cache):  # a prefill: a new request's prompt
            self.prompts.append(prompt)
            self.pos = 0
        n = len(self.prompts) - 1
        if n in self.holds and self.pos >= self.holds[n]:
            self._released[n].wait(WAIT_S)
        script = self.replies[min(n, len(self.replies) - 1)]
        logits = torch.full((idx.size(0), idx.size(1), self.vocab), -1e4)
        logits[:, :, script[min(self.pos, len(script) - 1)]] = 1e4
        self.pos += 1
        return logits if logits_at is None else logits[:, logits_at]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], 300)


def script(tok, *parts: str | bytes) -> list[int]:
    """Tokens writing `parts` then ending the turn; bytes parts are written one byte-token at a time,
    so a multi-byte character reaches the server split across tokens."""
    ids: list[int] = []
    for part in parts:
        ids += list(part) if isinstance(part, bytes) else tok.encode_ordinary(part)
    return [*ids, tok.special_id("<|assistant_end|>")]


def recording(app, bodies: list[dict]):
    """`app`, also keeping the JSON body of every chat completion request it gets."""
    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await app(scope, receive, send)
        parts: list[bytes] = []

        async def receive_and_keep():
            message = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    bodies.append(json.loads(b"".join(parts)))
            return message

        return await app(scope, receive_and_keep, send)
    return wrapped


def serve_page(engine_model, tok, name="scripted/sft@1", **kwargs):
    bodies: list[dict] = []
    app = create_app(Engine(engine_model, tok, init_runtime(device="cpu")), name, **kwargs)
    return serving(recording(app, bodies)), bodies


SHOWN = """return [...document.querySelectorAll('#messages .msg')].map((m) => {
  const note = m.querySelector('.note');
  const role = m.classList.contains('user') ? 'user' : m.classList.contains('assistant') ? 'assistant' : '?';
  return [role, m.querySelector('.content').textContent, note.hidden ? '' : note.textContent];
})"""


def shown(driver) -> list[tuple[str, str]]:
    """The messages on the page, as (role, text)."""
    return [(role, text) for role, text, _ in driver.execute_script(SHOWN)]


def notes(driver) -> list[str]:
    return [note for _, _, note in driver.execute_script(SHOWN)]


def idle(driver) -> bool:
    return driver.execute_script("return document.body.dataset.busy") == "false"


def open_page(driver, base: str, model_name: str | None = None):
    from selenium.webdriver.common.by import By

    driver.get(base)
    if model_name is not None:
        wait(driver, lambda d: d.find_element(By.ID, "model").text == model_name, "the model name is not shown")
    return driver.find_element(By.ID, "input")


def test_chat_streams_replies_multi_turn_regenerate_and_new_chat(driver, tok):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    first = "Héllo, wörld ✓"
    second = "Two lines:\n<b>not bold</b> & <script>x</script>"
    third = "Regenerated — 日本"
    model = ScriptedChat(tok, [script(tok, "Héllo, wörld ", "✓".encode()), script(tok, second),
                               script(tok, "Regenerated — ", "日本".encode())])
    server, bodies = serve_page(model, tok)
    with server as base:
        box = open_page(driver, base, "scripted/sft@1")
        assert driver.find_element(By.ID, "regenerate").get_attribute("disabled")  # nothing to regenerate yet

        box.send_keys("Hi there", Keys.ENTER)
        wait(driver, lambda d: idle(d) and len(shown(d)) == 2, "no reply")
        assert shown(driver) == [("user", "Hi there"), ("assistant", first)]
        assert box.get_attribute("value") == ""

        # Shift+Enter is a newline, not a send
        box.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.NULL, "line two")
        assert box.get_attribute("value") == "line one\nline two" and len(bodies) == 1
        box.send_keys(Keys.ENTER)
        wait(driver, lambda d: idle(d) and len(shown(d)) == 4, "no second reply")
        assert shown(driver)[2:] == [("user", "line one\nline two"), ("assistant", second)]
        assert driver.find_elements(By.CSS_SELECTOR, "#messages b, #messages script") == []  # shown as text

        # every turn goes back to the server
        turns = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": first},
                 {"role": "user", "content": "line one\nline two"}]
        assert bodies[1]["messages"] == turns and bodies[1]["stream"] is True
        assert model.prompts[1] == render_for_completion(tok, turns)

        # regenerate asks the last question again and replaces the last reply
        driver.find_element(By.ID, "regenerate").click()
        wait(driver, lambda d: idle(d) and len(model.prompts) == 3 and shown(d)[-1] == ("assistant", third),
             "no regenerated reply")
        assert len(shown(driver)) == 4 and bodies[2]["messages"] == turns
        assert driver.execute_script("return nanochat.conversation()") == [*turns,
                                                                            {"role": "assistant", "content": third}]

        driver.find_element(By.ID, "clear").click()
        wait(driver, lambda d: shown(d) == [], "new chat did not clear the messages")
        assert driver.execute_script("return nanochat.conversation()") == []
        box.send_keys("Fresh start", Keys.ENTER)
        wait(driver, lambda d: idle(d) and len(shown(d)) == 2, "no reply after new chat")
        assert bodies[-1]["messages"] == [{"role": "user", "content": "Fresh start"}]


def test_stop_keeps_the_partial_reply_and_settings_reach_the_server(driver, tok):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    partial = tok.encode_ordinary("Partial answer")
    replies = [script(tok, "never shown"), [*partial, *script(tok, " and the rest")], script(tok, "Done."),
               script(tok, "one two three four five six"), script(tok)]
    model = ScriptedChat(tok, replies, holds={0: 0, 1: len(partial)})
    server, bodies = serve_page(model, tok)
    with server as base:
        box = open_page(driver, base, "scripted/sft@1")
        stop, send = driver.find_element(By.ID, "stop"), driver.find_element(By.ID, "send")

        # stopped before any text: the turn is taken back and the question returns to the input
        box.send_keys("First", Keys.ENTER)
        wait(driver, lambda d: len(model.prompts) == 1 and stop.is_displayed(), "the request did not start")
        assert not send.is_displayed()
        stop.click()
        wait(driver, idle, "stop did not end the request")
        model.release(0)
        assert shown(driver) == [] and box.get_attribute("value") == "First"

        # stopped mid-reply: the partial reply stays, and is part of the conversation
        box.send_keys(Keys.ENTER)
        wait(driver, lambda d: shown(d)[-1:] == [("assistant", "Partial answer")], "the reply did not stream in")
        assert not idle(driver)
        stop.click()
        wait(driver, idle, "stop did not end the request")
        model.release(1)
        assert shown(driver) == [("user", "First"), ("assistant", "Partial answer")]
        assert notes(driver)[-1] == "stopped" and send.is_displayed() and not stop.is_displayed()

        box.send_keys("Go on", Keys.ENTER)
        wait(driver, lambda d: idle(d) and len(shown(d)) == 4, "no reply after stop")
        assert bodies[-1]["messages"] == [{"role": "user", "content": "First"},
                                          {"role": "assistant", "content": "Partial answer"},
                                          {"role": "user", "content": "Go on"}]
        assert shown(driver)[-1] == ("assistant", "Done.")

        # settings: temperature, max tokens, top-k and a system prompt go with the request
        driver.find_element(By.ID, "settings-toggle").click()
        driver.execute_script("const t = document.getElementById('temperature'); t.value = '0.3';"
                              "t.dispatchEvent(new Event('input'));")
        assert driver.find_element(By.ID, "temperature-value").text == "0.30"
        for field, value in (("max-tokens", "3"), ("top-k", "5"), ("system", "Be brief.")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        box.send_keys("Count", Keys.ENTER)
        wait(driver, lambda d: idle(d) and len(shown(d)) == 6, "no reply with the new settings")
        body = bodies[-1]
        assert (body["temperature"], body["max_tokens"], body["top_k"]) == (0.3, 3, 5)
        assert body["messages"][0] == {"role": "system", "content": "Be brief."}
        assert shown(driver)[-1] == ("assistant", tok.decode(replies[3][:3]))  # cut at max_tokens
        assert "max tokens" in notes(driver)[-1]

        # an empty reply is said so, and the question returns to the input
        box.send_keys("Say nothing", Keys.ENTER)
        error = driver.find_element(By.ID, "error")
        wait(driver, lambda d: idle(d) and error.is_displayed(), "the empty reply is not reported")
        assert "without writing anything" in error.text
        assert len(shown(driver)) == 6 and box.get_attribute("value") == "Say nothing"

        # the settings survive a reload (localStorage)
        open_page(driver, base)
        values = driver.execute_script("return ['temperature', 'max-tokens', 'top-k', 'system']"
                                       ".map((id) => document.getElementById(id).value)")
        assert values == ["0.3", "3", "5", "Be brief."]


def test_api_key_401_is_shown_and_the_key_is_kept(driver, tok):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    model = ScriptedChat(tok, [script(tok, "Authorized.")])
    server, bodies = serve_page(model, tok, api_key="s3cret")
    with server as base:
        box = open_page(driver, base)
        error = driver.find_element(By.ID, "error")
        wait(driver, lambda d: error.is_displayed(), "the 401 is not shown")
        assert "401" in error.text and "API key" in error.text
        assert driver.find_element(By.ID, "settings").is_displayed()  # opened, to enter the key

        # a wrong key: the send fails with the 401 and the question is kept for another try
        key = driver.find_element(By.ID, "api-key")
        key.send_keys("wrong", Keys.TAB)
        box.send_keys("Hello?", Keys.ENTER)
        wait(driver, lambda d: idle(d) and error.is_displayed() and "incorrect API key" in error.text,
             "the wrong key's 401 is not shown")
        assert shown(driver) == [] and box.get_attribute("value") == "Hello?" and bodies == []

        key.clear()
        key.send_keys("s3cret", Keys.TAB)
        wait(driver, lambda d: d.find_element(By.ID, "model").text == "scripted/sft@1", "the key did not unlock")
        assert not error.is_displayed()
        box.send_keys(Keys.ENTER)
        wait(driver, lambda d: idle(d) and len(shown(d)) == 2, "no reply with the key")
        assert shown(driver) == [("user", "Hello?"), ("assistant", "Authorized.")]

        open_page(driver, base, "scripted/sft@1")  # the key is remembered
        assert not driver.find_element(By.ID, "error").is_displayed()


def test_chat_with_a_real_untrained_model(driver, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    make_chat_model(run="t", tokenizer="t")
    engine, name = load_engine(ModelSource(run="t"), init_runtime(device="cpu"))
    bodies: list[dict] = []
    with serving(recording(create_app(engine, name), bodies)) as base:
        box = open_page(driver, base, name)
        driver.find_element(By.ID, "settings-toggle").click()
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("8")  # the test model's context is 128 tokens
        driver.execute_script("const t = document.getElementById('temperature'); t.value = '0';"
                              "t.dispatchEvent(new Event('input'));")  # greedy: the same noise every run
        for turn, text in enumerate(["Hello there!", "And again?"], 1):
            box.send_keys(text, Keys.ENTER)
            wait(driver, lambda d, n=2 * turn: idle(d) and len(shown(d)) == n, f"no reply to turn {turn}")
        messages = shown(driver)
        assert [role for role, _ in messages] == ["user", "assistant"] * 2
        assert all(text for _, text in messages)  # an untrained model writes noise, but something
        assert driver.find_element(By.ID, "error").is_displayed() is False
        assert len(bodies) == 2 and bodies[1]["messages"][:2] == [
            {"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": messages[1][1]}]
