"""`nanochat serve` over real HTTP: the official openai client, malformed and oversized requests,
the API key, a full queue, a client that disconnects, a burst of concurrent streams, and the CLI.

A real (untrained) GPT checks the whole path; a stand-in model with a fixed script checks exact
text and token counts, and, gated on a semaphore, makes queue and cancellation states exact —
the tests wait on events, never on the clock.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx2
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from nanochat.chat_format import render_for_completion
from nanochat.cli import main
from nanochat.config import DeviceConfig, ModelSource
from nanochat.engine import Engine, load_engine
from nanochat.runtime import init_runtime
from nanochat.serve.app import STATIC, cli, create_app
from tests._chat_model import chat_model_home, new_prompts, scripted_slot_cache
from tests._server import serving

RT = init_runtime(device="cpu")
KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
WAIT_S = 60  # upper bound for any one wait; tests wait on events, not on time
HELLO = [{"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return chat_model_home(tmp_path_factory)


@pytest.fixture(scope="module")
def model(home):
    """(engine, name) over the small untrained GPT; its context is 4 × 128 = 512 positions."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_HOME", str(home))
        return load_engine(ModelSource(run="t", runtime=DeviceConfig(device="cpu")), RT)


@pytest.fixture(scope="module")
def server(model):
    """The real model behind an API key: two workers sharing it, room for 32 waiting requests."""
    engine, name = model
    with serving(create_app([engine, engine], name, api_key=KEY, max_queue=32)) as base:
        yield base


class Script(nn.Module):
    """A stand-in model whose every reply is `script` (each prefill starts it over; past its end it
    repeats the last token). `gated`: each forward pass first takes a permit from `permits`, so a
    test decides exactly how far generation gets. `replies` counts forward passes per reply."""

    def __init__(self, script: list[int], vocab: int, gated: bool = False, fail_once: bool = False):
        super().__init__()
        self.script, self.vocab, self.fail_once = script, vocab, fail_once
        self.max_positions = 512
        self.permits = threading.Semaphore(0) if gated else None
        self.entered = threading.Event()
        self.replies: list[int] = []

    def new_kv_cache(self, batch, max_len, pad=None, dtype=None):
        return None

    new_slot_cache = staticmethod(scripted_slot_cache)

    def forward(self, idx, kv_cache=None, logits_at=None):
        self.entered.set()
        if self.permits is not None and not self.permits.acquire(timeout=WAIT_S):
            raise RuntimeError("the test never let the model go on")
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("boom")
        if new_prompts(idx, kv_cache):  # a prompt: a new reply
            self.replies.append(0)
        self.replies[-1] += 1
        token = self.script[min(self.replies[-1] - 1, len(self.script) - 1)]
        logits = torch.full((idx.size(0), idx.size(1), self.vocab), -10.0)
        logits[:, :, token] = 10.0
        return logits if logits_at is None else logits[:, logits_at]


def scripted(model, text: str = "", end: bool = True, **kwargs) -> tuple[Engine, Script]:
    tok = model[0].tok
    script = tok.encode_ordinary(text) + ([tok.special_id("<|assistant_end|>")] if end else [])
    stand_in = Script(script, tok.vocab_size, **kwargs)
    return Engine(stand_in, tok, RT), stand_in


def request(stream: bool = False, **fields) -> dict:
    return {"model": "m", "messages": HELLO, "stream": stream, **fields}


def read_events(response) -> list[str]:
    """The `data:` payloads of an SSE response, read to its end."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def assert_openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


# ---------------------------------------------------------------------------------------------
# The openai client


def test_openai_client_stream_matches_non_stream(server, model):
    engine, name = model
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    prompt_tokens = len(render_for_completion(engine.tok, HELLO))
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 7, "top_p": 0.95, "extra_body": {"top_k": 50}}):
        full = client.chat.completions.create(model=name, messages=HELLO, max_tokens=12, **sampling)
        choice, usage = full.choices[0], full.usage
        assert full.object == "chat.completion" and full.model == name
        assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
        assert usage.prompt_tokens == prompt_tokens
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        if choice.finish_reason == "length":
            assert usage.completion_tokens == 12
        else:
            assert choice.finish_reason == "stop" and 1 <= usage.completion_tokens <= 12

        chunks = list(client.chat.completions.create(model=name, messages=HELLO, max_tokens=12, stream=True,
                                                     stream_options={"include_usage": True}, **sampling))
        with_choices = [c for c in chunks if c.choices]
        assert with_choices[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in with_choices) == choice.message.content
        assert [c.choices[0].finish_reason for c in with_choices] == [None] * (len(with_choices) - 1) + \
            [choice.finish_reason]
        assert chunks[-1].usage == usage


def test_openai_client_exact_reply_and_usage(model):
    engine, stand_in = scripted(model, "Hi! Café 日本語.")
    with serving(create_app(engine, "scripted")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        full = client.chat.completions.create(model="scripted", messages=HELLO, max_tokens=50)
        assert full.choices[0].message.content == "Hi! Café 日本語."
        assert full.choices[0].finish_reason == "stop"
        assert full.usage.completion_tokens == len(stand_in.script)  # the text and <|assistant_end|>
        assert full.usage.prompt_tokens == len(render_for_completion(engine.tok, HELLO))
        short = client.chat.completions.create(model="scripted", messages=HELLO, max_tokens=3)
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
        assert [m.id for m in client.models.list()] == ["scripted"]
        assert client.models.retrieve("scripted").id == "scripted"


# ---------------------------------------------------------------------------------------------
# Bad requests


def _bad_requests() -> list[tuple[str, bytes | str | dict, str]]:
    """(what, body, a word the error message must contain)."""
    user = {"role": "user", "content": "hi"}
    return [
        ("not JSON", '{"messages": [', "JSON"),
        ("not UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
        ("not an object", "[1, 2]", "request body"),
        ("no messages", {}, "messages"),
        ("empty messages", {"messages": []}, "messages"),
        ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ("no content", {"messages": [{"role": "user"}]}, "content"),
        ("number content", {"messages": [{"role": "user", "content": 42}]}, "string"),
        ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text only"),
        ("message not an object", {"messages": ["hi"]}, "messages.0"),
        ("assistant first", {"messages": [{"role": "assistant", "content": "hi"}, user]}, "alternate"),
        ("ends with assistant", {"messages": [user, {"role": "assistant", "content": "hi"}]}, "last message"),
        ("two systems", {"messages": [{"role": "system", "content": "a"}] * 2 + [user]}, "system"),
        ("too many messages", {"messages": [user] * 600}, "messages"),
        ("message too long", {"messages": [{"role": "user", "content": "x" * 100_001}]}, "100000"),
        ("temperature", {"messages": [user], "temperature": 2.5}, "temperature"),
        ("top_p zero", {"messages": [user], "top_p": 0}, "top_p"),
        ("top_k zero", {"messages": [user], "top_k": 0}, "top_k"),
        ("max_tokens zero", {"messages": [user], "max_tokens": 0}, "max_tokens"),
        ("max_tokens text", {"messages": [user], "max_tokens": "many"}, "max_tokens"),
        ("n", {"messages": [user], "n": 0}, "greater than or equal to 1"),
        ("n over the batch", {"messages": [user], "n": 9}, "--max-batch"),
        ("seed", {"messages": [user], "seed": "abc"}, "seed"),
    ]


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(server):
    with httpx2.Client(base_url=server, headers=AUTH, timeout=WAIT_S) as client:
        for what, body, word in _bad_requests():
            content = body if isinstance(body, (bytes, str)) else json.dumps(body)
            response = client.post(CHAT, content=content, headers={"Content-Type": "application/json"})
            error = assert_openai_error(response, 400)
            assert word in error["message"], (what, error)
            assert error["type"] == "invalid_request_error"
        assert assert_openai_error(client.get("/v1/nothing"), 404)["message"].startswith("Not Found")
        assert_openai_error(client.get(CHAT), 405)
        assert assert_openai_error(client.get("/v1/models/other"), 404)["code"] == "model_not_found"
        parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]  # OpenAI's list form
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
        ok = client.post(CHAT, json=request(max_tokens=3, messages=messages))
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert client.get("/health").json()["status"] == "ok"


def test_prompt_plus_max_tokens_over_the_context_is_refused(server, model):
    engine, _ = model
    prompt_tokens = len(render_for_completion(engine.tok, HELLO))
    with httpx2.Client(base_url=server, headers=AUTH, timeout=WAIT_S) as client:
        error = assert_openai_error(client.post(CHAT, json=request(max_tokens=513 - prompt_tokens)), 400)
        assert "512" in error["message"] and f"{prompt_tokens} tokens" in error["message"], error
        assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
        long = [{"role": "user", "content": "qx7 " * 400}]  # well over 512 tokens
        error = assert_openai_error(client.post(CHAT, json=request(messages=long)), 400)
        assert "512" in error["message"] and error["code"] == "context_length_exceeded"
        exact = client.post(CHAT, json=request(max_tokens=512 - prompt_tokens, temperature=0))
        assert exact.status_code == 200, exact.text  # the whole context is usable


def test_api_key_is_required_on_v1_only(server):
    with httpx2.Client(base_url=server, timeout=WAIT_S) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            error = assert_openai_error(client.post(CHAT, json=request(max_tokens=2), headers=headers), 401)
            assert error["code"] == "invalid_api_key"
            assert_openai_error(client.get("/v1/models", headers=headers), 401)
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == (200 if (STATIC / "index.html").is_file() else 404)
        assert client.get("/v1/models", headers=AUTH).status_code == 200
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_the_chat_page_is_served(model):
    engine, name = model
    with serving(create_app(engine, name)) as base, httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        page = client.get("/")
        if (STATIC / "index.html").is_file():
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert page.content == (STATIC / "index.html").read_bytes()
            assert client.get("/static/index.html").content == page.content
        else:
            assert page.status_code == 404 and "missing" in page.text


# ---------------------------------------------------------------------------------------------
# Workers: a full queue, disconnects, failures, load


def test_full_queue_answers_503_and_recovers(model):
    engine, stand_in = scripted(model, "ab", end=False, gated=True)
    app = create_app(engine, "gated", max_queue=1, max_batch=1)  # room for one running and one waiting request
    with serving(app) as base, httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        with client.stream("POST", CHAT, json=request(stream=True, max_tokens=3)) as running:
            assert running.status_code == 200
            assert stand_in.entered.wait(WAIT_S)  # the worker is inside the model, waiting for a permit
            with client.stream("POST", CHAT, json=request(stream=True, max_tokens=3)) as waiting:
                assert waiting.status_code == 200
                health = client.get("/health").json()
                assert (health["busy"], health["waiting"]) == (1, 1)
                error = assert_openai_error(client.post(CHAT, json=request(max_tokens=3)), 503)
                assert error["code"] == "overloaded" and error["type"] == "server_error"
                stand_in.permits.release(1000)
                assert read_events(waiting)[-1] == "[DONE]"
            assert read_events(running)[-1] == "[DONE]"
        after = client.post(CHAT, json=request(max_tokens=3))
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3


def test_client_disconnect_stops_its_generation(model, monkeypatch):
    engine, stand_in = scripted(model, "ab", end=False, gated=True)
    app = create_app(engine, "gated")
    pool, cancelled = app.state.pool, threading.Event()
    cancel = pool.cancel
    monkeypatch.setattr(pool, "cancel", lambda job: (cancel(job), cancelled.set()))
    with serving(app) as base, httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        stand_in.permits.release(1)  # the prompt's forward pass: the first token, then the model waits
        with client.stream("POST", CHAT, json=request(stream=True, max_tokens=200)) as response:
            lines = response.iter_lines()
            contents = (json.loads(line[6:])["choices"][0]["delta"] for line in lines if line.startswith("data: "))
            assert "role" in next(contents) and "content" in next(contents)
        assert cancelled.wait(WAIT_S)  # the server saw the client go
        stand_in.permits.release(1000)
        after = client.post(CHAT, json=request(max_tokens=3))  # the single worker is free again
        assert after.status_code == 200
    assert stand_in.replies[0] <= 3  # stopped right after the disconnect, far from its 200 tokens


def test_a_failing_generation_is_reported_and_the_worker_survives(model):
    engine, _ = scripted(model, "ok", fail_once=True)
    with serving(create_app(engine, "fails")) as base, httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        error = assert_openai_error(client.post(CHAT, json=request()), 500)
        assert "boom" in error["message"] and error["type"] == "server_error"
        after = client.post(CHAT, json=request())
        assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "ok"


def test_32_concurrent_streams_all_complete(server):
    async def one(client: httpx2.AsyncClient, i: int) -> tuple[int, list[str]]:
        body = request(stream=True, max_tokens=4, temperature=0.8, seed=i)
        async with client.stream("POST", CHAT, json=body) as response:
            return response.status_code, [line async for line in response.aiter_lines() if line.startswith("data: ")]

    async def burst() -> list[tuple[int, list[str]]]:
        async with httpx2.AsyncClient(base_url=server, headers=AUTH, timeout=WAIT_S) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(32))), timeout=120)

    results = asyncio.run(burst())
    assert len(results) == 32
    for status, events in results:
        assert status == 200
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert all("error" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    health = httpx2.get(server + "/health").json()
    assert (health["busy"], health["waiting"]) == (0, 0)


# ---------------------------------------------------------------------------------------------
# The command


def test_serve_help():
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0


def test_serve_without_a_model_says_so(home, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_HOME", str(home))
    assert main(["serve", "--run", "missing", "--device", "cpu"]) == 1
    assert "run 'missing' has no" in capsys.readouterr().err


def test_serve_command_builds_the_app(home, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setenv("NANOCHAT_HOME", str(home))
    monkeypatch.setenv("NANOCHAT_API_KEY", KEY)
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    assert cli(["--run", "t", "--device", "cpu", "--port", "8123", "--workers", "2"]) == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    assert "http://127.0.0.1:8123/v1" in capsys.readouterr().out
    with serving(started["app"]) as base, httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "t/sft@1"
        assert client.get("/health").json()["workers"] == 2


def test_requests_waiting_together_share_one_batch_and_get_their_own_replies(model):
    """One worker, gated on its first reply: the requests that queue up behind it are written in one
    batched generation, and each reply is exactly what that request gets alone (its own seed,
    temperature and budget; the neighbours do not matter)."""
    engine, _ = model
    gate, entered = threading.Event(), threading.Event()
    rows_per_forward: list[int] = []  # the slot cache's rows each forward pass feeds

    def hold_first_prompt(_module, _args, kwargs):
        rows_per_forward.append(kwargs["kv_cache"].plan.rows.numel())
        if len(rows_per_forward) == 1:
            entered.set()
            assert gate.wait(WAIT_S)

    bodies = [request(max_tokens=4 + i, temperature=0.3 * i, seed=i) for i in range(5)]
    hook = engine.model.register_forward_pre_hook(hold_first_prompt, with_kwargs=True)
    try:
        with serving(create_app(engine, "batched", max_batch=4)) as base:
            async def burst() -> list[str]:
                async with httpx2.AsyncClient(base_url=base, timeout=WAIT_S) as client:
                    first = asyncio.create_task(client.post(CHAT, json=bodies[0]))
                    await asyncio.to_thread(entered.wait, WAIT_S)  # the worker is busy with the first
                    rest = [asyncio.create_task(client.post(CHAT, json=b)) for b in bodies[1:]]
                    while (await client.get("/health")).json()["waiting"] < len(rest):
                        await asyncio.sleep(0)  # let the event loop take the queued requests in
                    gate.set()
                    replies = await asyncio.gather(first, *rest)
                return [r.json()["choices"][0]["message"]["content"] for r in replies]

            together = asyncio.run(burst())
            batched = rows_per_forward.copy()
            with httpx2.Client(base_url=base, timeout=WAIT_S) as client:
                alone = [client.post(CHAT, json=b).json()["choices"][0]["message"]["content"] for b in bodies]
    finally:
        hook.remove()
    assert together == alone
    assert batched[0] == 1 and max(batched) == 4  # the first alone, then four of the waiting ones together


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_request_arriving_mid_reply_is_answered_before_the_reply_ends(model, batching):
    """One worker, gated forward passes: a 400-token reply is being written when a 3-token request
    comes in. Continuously batched, the newcomer joins at the next step and is answered within a
    few passes; statically batched, it waits for the whole long reply (the old behaviour)."""
    engine, stand_in = scripted(model, "ab", end=False, gated=True)
    with serving(create_app(engine, "gated", batching=batching)) as base, \
            httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        stand_in.permits.release(5)  # the long reply's prompt and its first few tokens
        with client.stream("POST", CHAT, json=request(stream=True, max_tokens=400,
                                                      stream_options={"include_usage": True})) as long:
            events = (line for line in long.iter_lines() if line.startswith("data: "))
            assert "role" in json.loads(next(events)[6:])["choices"][0]["delta"]
            short_done, short = threading.Event(), {}

            def ask_short():  # its own client: one httpx client is not to be shared between threads
                try:
                    with httpx2.Client(base_url=base, timeout=WAIT_S) as own:
                        short["response"] = own.post(CHAT, json=request(max_tokens=3))
                finally:
                    short_done.set()

            asker = threading.Thread(target=ask_short)
            asker.start()
            while not short_done.is_set() and sum(client.get("/health").json()[k] for k in ("waiting", "busy")) < 2:
                threading.Event().wait(0.01)  # the short request is in the server
            assert not short_done.is_set(), short  # nothing answers it before the model is let go on
            stand_in.permits.release(12)  # enough passes for the newcomer, a few of the 400 for the long one
            answered = short_done.wait(10 if batching == "continuous" else 1)
            assert answered == (batching == "continuous")
            stand_in.permits.release(10_000)
            rest = [line[6:] for line in events]
            asker.join(WAIT_S)
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["usage"]["completion_tokens"] == 400  # the long reply ran to its end either way
    assert short["response"].json()["usage"]["completion_tokens"] == 3


def test_a_reply_with_unicode_line_separators_keeps_each_event_on_one_line(model):
    """U+2028, U+2029 and U+0085 end a line for str.splitlines, and so for httpx's iter_lines (what
    our benchmark and many clients read a stream with); the server writes them escaped."""
    text = "one\u2028two\x85three\u2029four"
    engine, _ = scripted(model, text)
    with serving(create_app(engine, "separators")) as base, httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        with client.stream("POST", CHAT, json=request(stream=True, max_tokens=40)) as response:
            events = read_events(response)
    chunks = [json.loads(e) for e in events[:-1]]  # each line whole: no JSONDecodeError
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_reply_before_them(model, stream):
    engine, _ = scripted(model, "Hello there, the cat sat on the mat.")
    tok = engine.tok
    assert len(tok.encode_ordinary(" cat")) > 1 or len(tok.encode_ordinary("the c")) > 1  # a stop across tokens

    def ask(client, **fields) -> tuple[str, str, int]:
        body = request(stream=stream, **{"max_tokens": 40, **fields})
        if not stream:
            data = client.post(CHAT, json=body).json()
            choice = data["choices"][0]
            return choice["message"]["content"], choice["finish_reason"], data["usage"]["completion_tokens"]
        with client.stream("POST", CHAT, json={**body, "stream_options": {"include_usage": True}}) as response:
            chunks = [json.loads(e) for e in read_events(response)[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        return text, [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"], \
            chunks[-1]["usage"]["completion_tokens"]

    with serving(create_app(engine, "stops")) as base, httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        full, reason, n = ask(client)
        assert (full, reason) == ("Hello there, the cat sat on the mat.", "stop")
        assert ask(client, stop="mat")[2] <= n  # usage counts what was generated, up to the stop
        assert ask(client, stop="e c")[:2] == ("Hello there, th", "stop")  # "e c" spans tokens
        assert ask(client, stop=["mat", "sat", "zebra"])[:2] == ("Hello there, the cat ", "stop")
        text, reason, _ = ask(client, stop=["the mat.x"])  # starts matching at the end, never completes
        assert (text, reason) == (full, "stop")
        assert ask(client, stop="zebra", max_tokens=3)[1] == "length"
        error = assert_openai_error(client.post(CHAT, json=request(stop=["a", "b", "c", "d", "e"])), 400)
        assert error["param"] == "stop"


def test_metrics_parse_as_prometheus_and_count_what_happened(model):
    engine, _ = scripted(model, "Hello there, the cat sat.")
    with serving(create_app(engine, "metered", api_key=KEY)) as base, \
            httpx2.Client(base_url=base, timeout=WAIT_S, headers=AUTH) as client:
        replies = [client.post(CHAT, json=request(max_tokens=m)).json() for m in (3, 40)]
        with client.stream("POST", CHAT, json=request(stream=True, max_tokens=5)) as response:
            events = read_events(response)
        assert events[-1] == "[DONE]"
        pieces = sum(bool(json.loads(e)["choices"][0]["delta"].get("content")) for e in events[:-1])
        assert_openai_error(client.post(CHAT, json=request(max_tokens=0)), 400)
        exposition = httpx2.get(base + "/metrics").text  # no API key needed, like /health
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("nanochat_requests_total", (("status", "200"),))] == 3
    assert value[("nanochat_requests_total", (("status", "400"),))] == 1
    assert value[("nanochat_completion_tokens_total", ())] == sum(r["usage"]["completion_tokens"] for r in replies) + 5
    assert value[("nanochat_prompt_tokens_total", ())] == 3 * replies[0]["usage"]["prompt_tokens"]
    assert value[("nanochat_time_to_first_token_seconds_count", ())] == 3
    # one gap between consecutive pieces; pieces that queued up while the server was busy come joined,
    # so the count is not fixed, but the streamed reply's own gaps are in it
    assert value[("nanochat_inter_token_latency_seconds_count", ())] >= pieces - 1
    assert value[("nanochat_inter_token_latency_seconds_count", ())] <= sum(r["usage"]["completion_tokens"]
                                                                            for r in replies) + 5 - 3
    assert value[("nanochat_queue_length", ())] == 0 and value[("nanochat_running_batch_size", ())] == 0


def test_n_choices_share_one_prefill_and_each_is_its_seeds_reply(model):
    engine, _ = model
    prefills: list[int] = []  # for each forward pass that starts a prefill, how many prompts it starts

    def count_prefills(_module, args, kwargs):
        if started := new_prompts(args[0], kwargs.get("kv_cache")):
            prefills.append(len(started))

    hook = engine.model.register_forward_pre_hook(count_prefills, with_kwargs=True)
    try:
        with serving(create_app(engine, "choices")) as base, httpx2.Client(base_url=base, timeout=WAIT_S) as client:
            body = request(max_tokens=12, temperature=0.9, seed=40)
            prefills.clear()
            three = client.post(CHAT, json={**body, "n": 3}).json()
            assert prefills == [1]  # one pass over the prompt for all three choices
            alone = [client.post(CHAT, json={**body, "seed": 40 + i}).json() for i in range(3)]
            with client.stream("POST", CHAT, json={**body, "n": 3, "stream": True,
                                                   "stream_options": {"include_usage": True}}) as response:
                chunks = [json.loads(e) for e in read_events(response)[:-1]]
    finally:
        hook.remove()
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in three["choices"]] == \
        [a["choices"][0]["message"]["content"] for a in alone]
    assert len({c["message"]["content"] for c in three["choices"]}) > 1  # different seeds, different replies
    assert [c["finish_reason"] for c in three["choices"]] == [a["choices"][0]["finish_reason"] for a in alone]
    assert three["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    streamed = {i: "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                           if c["choices"] and c["choices"][0]["index"] == i) for i in range(3)}
    assert [streamed[i] for i in range(3)] == [c["message"]["content"] for c in three["choices"]]
    ends = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
            if c["choices"] and c["choices"][0]["finish_reason"]}
    assert ends == {i: c["finish_reason"] for i, c in enumerate(three["choices"])}
    assert chunks[-1]["usage"] == three["usage"]


def test_a_model_without_a_slot_cache_is_served_by_the_static_batcher(model, caplog):
    engine, stand_in = scripted(model, "ok")
    stand_in.new_slot_cache = None  # a stand-in that cannot keep per-row slots
    with serving(create_app(engine, "no-slots")) as base, httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        reply = client.post(CHAT, json=request())
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "ok"
    assert "batching statically" in caplog.text


def test_a_job_hands_out_queued_pieces_joined_and_each_on_its_own_when_kept_up_with():
    from nanochat.engine import Sampling
    from nanochat.serve.workers import Finished, Job, LoopOutlet, emit_all

    async def scenario():
        job = Job([1], Sampling(), LoopOutlet(asyncio.get_running_loop()), n=2)
        events = job.events()
        emit_all([(job, (0, "a")), (job, (0, "b")), (job, (1, "x")), (job, (0, "c"))])  # one step's news
        await asyncio.sleep(0)  # the worker's call lands: everything is queued before it is read
        first = [await anext(events) for _ in range(3)]
        job.emit((1, "y"))
        second = await anext(events)  # a reader that keeps up gets each piece as it comes
        emit_all([(job, Finished("stop", 3, 0)), (job, (1, "z")), (job, Finished("length", 3, 1))])
        rest = [item async for item in events]
        return first, second, rest

    first, second, rest = asyncio.run(scenario())
    assert first == [(0, "ab"), (1, "x"), (0, "c")]  # joined within a choice, never across choices
    assert second == (1, "y")
    assert rest == [Finished("stop", 3, 0), (1, "z"), Finished("length", 3, 1)]
