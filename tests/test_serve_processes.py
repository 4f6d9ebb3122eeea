"""Engines in processes of their own (what `nanochat serve` runs): the same replies as an engine in
the server's process, cancellation and stop strings that reach the child, the 503 bound counted in
the server, a child that cannot start or that dies, and each reply failing cleanly rather than
hanging. A real (untrained) GPT on disk, loaded by each child as `nanochat serve` would."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx2
import pytest

from nanochat.config import DeviceConfig, ModelSource
from nanochat.engine import load_engine
from nanochat.errors import NanochatError
from nanochat.runtime import init_runtime
from nanochat.serve import processes
from nanochat.serve.app import create_app
from nanochat.serve.processes import ProcessPool, core_plan, default_threads, engine_makers
from nanochat.serve.workers import Finished
from tests._chat_model import chat_model_home
from tests._server import serving

RT = init_runtime(device="cpu")
CHAT = "/v1/chat/completions"
WAIT_S = 60
SOURCE = ModelSource(run="t", runtime=DeviceConfig(device="cpu"))


def wait_until(condition, what: str) -> None:
    """Poll `condition` until it holds; fail after WAIT_S seconds instead of hanging."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


def request(stream: bool = False, **fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Hello there!"}], "stream": stream, **fields}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = chat_model_home(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:  # the children inherit it
        mp.setenv("NANOCHAT_HOME", str(path))
        yield path


def process_pool(source: ModelSource = SOURCE, workers: int = 1, **kwargs) -> ProcessPool:
    engine, _ = load_engine(SOURCE, RT)
    return ProcessPool(engine_makers(source, RT, workers), engine.tok, kwargs.pop("max_queue", 8), **kwargs)


@pytest.fixture(scope="module")
def both(home):
    """(base URL of a server over one engine process, base URL of one over an engine in its own process)."""
    engine, _ = load_engine(SOURCE, RT)
    with serving(create_app(process_pool(max_batch=4), "t"), startup_timeout=WAIT_S) as remote, \
            serving(create_app(engine, "t", max_batch=4)) as local:
        yield remote, local


def read_stream(client: httpx2.Client, body: dict) -> tuple[str, list[dict]]:
    with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]), chunks


def test_an_engine_process_answers_as_the_engine_in_the_server_does(both):
    remote, local = both
    bodies = [request(max_tokens=16, temperature=0), request(max_tokens=20, temperature=0.9, seed=3, top_k=40),
              request(max_tokens=12, temperature=0.9, seed=5, n=3), request(max_tokens=30, temperature=0.8, seed=1,
                                                                           stop=["e", "a"])]
    with httpx2.Client(base_url=remote, timeout=WAIT_S) as far, httpx2.Client(base_url=local, timeout=WAIT_S) as near:
        for body in bodies:
            got, want = far.post(CHAT, json=body).json(), near.post(CHAT, json=body).json()
            assert [c["message"] for c in got["choices"]] == [c["message"] for c in want["choices"]]
            assert [c["finish_reason"] for c in got["choices"]] == [c["finish_reason"] for c in want["choices"]]
            if "stop" not in body:  # after a stop string, usage counts what was written until the engine heard
                assert got["usage"] == want["usage"]
            else:
                assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
            streamed, _ = read_stream(far, {**body, "n": 1, "stream": True})
            assert streamed == got["choices"][0]["message"]["content"]
        assert far.get("/health").json()["workers"] == 1


def test_a_client_that_goes_away_frees_its_slot_in_the_child(both, monkeypatch):
    """A greedy reply of this model runs to its budget (480 tokens); the client leaves after its
    first piece, and the child stops writing it long before the end."""
    remote, _ = both
    ends: list[Finished] = []
    deliver = processes.emit_all
    monkeypatch.setattr(processes, "emit_all", lambda batch: (ends.extend(item for _, item in batch
                                                                          if isinstance(item, Finished)),
                                                              deliver(batch)))
    with httpx2.Client(base_url=remote, timeout=WAIT_S) as client:
        with client.stream("POST", CHAT, json=request(stream=True, max_tokens=480, temperature=0)) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            next(lines), next(lines)  # the role, then the first piece: the reply is being written
            assert client.get("/health").json()["busy"] == 1
        wait_until(lambda: ends, "the child to end the abandoned reply")  # it frees the slot at its next step
        assert ends[0].completion_tokens < 480
        health = client.get("/health").json()
        assert (health["busy"], health["waiting"]) == (0, 0)
        assert client.post(CHAT, json=request(max_tokens=3)).status_code == 200


def test_a_full_queue_is_refused_by_the_server_before_the_child_hears_of_it(home):
    pool = process_pool(max_queue=0, max_batch=1)
    with serving(create_app(pool, "t"), startup_timeout=WAIT_S) as base, \
            httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        with client.stream("POST", CHAT, json=request(stream=True, max_tokens=400, temperature=1.0)) as running:
            lines = (line for line in running.iter_lines() if line.startswith("data: "))
            next(lines), next(lines)  # running: the child said it started it
            refused = client.post(CHAT, json=request(max_tokens=3))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        wait_until(lambda: client.get("/health").json()["busy"] == 0, "the abandoned reply to end")
        assert client.post(CHAT, json=request(max_tokens=3)).status_code == 200


def test_an_engine_process_that_cannot_start_says_why(home):
    pool = process_pool(ModelSource(run="missing", runtime=DeviceConfig(device="cpu")))
    with pytest.raises(NanochatError, match="could not start: NanochatError: run 'missing' has no"):
        pool.start()


def test_a_dying_engine_process_fails_its_replies_and_the_server_says_so(home):
    pool = process_pool()
    with serving(create_app(pool, "t"), startup_timeout=WAIT_S) as base, \
            httpx2.Client(base_url=base, timeout=WAIT_S) as client:
        with client.stream("POST", CHAT, json=request(stream=True, max_tokens=400, temperature=1.0)) as running:
            lines = (line for line in running.iter_lines() if line.startswith("data: "))
            next(lines), next(lines)
            (child,) = pool._children
            os.kill(child.process.pid, signal.SIGKILL)
            rest = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
        assert "engine process exited" in rest[-1]["error"]["message"]
        after = client.post(CHAT, json=request(max_tokens=3))
        assert after.status_code == 500 and "no engine process is running" in after.json()["error"]["message"]
        assert client.get("/health").json()["busy"] == 0


def test_default_threads_leave_a_core_to_the_server(monkeypatch):
    monkeypatch.setattr(processes, "usable_cores", lambda: [0, 1])
    assert default_threads(1) == 1
    monkeypatch.setattr(processes, "usable_cores", lambda: list(range(16)))
    assert (default_threads(1), default_threads(2), default_threads(32)) == (15, 7, 1)


def test_core_plans_give_each_engine_cores_of_its_own_and_the_server_the_rest():
    assert core_plan([0, 1], 1, 1) == ([0], [[1]])
    assert core_plan(range(16), 2, 4) == (list(range(8)), [[8, 9, 10, 11], [12, 13, 14, 15]])
    assert core_plan([2, 5, 7], 2, 1) == ([2], [[5], [7]])  # a cpuset: the cores it has, not 0..n
    assert core_plan([0, 1], 1, 2) is None  # nothing would be left to the server
    assert core_plan([0, 1, 2, 3], 2, 2) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(processes.usable_cores()) < 2,
                    reason="pinning needs Linux and two cores")
def test_a_pinned_engine_process_keeps_to_its_cores_and_the_server_to_the_rest(home):
    before = os.sched_getaffinity(0)
    pool = process_pool(threads=1, pin=True)
    with serving(create_app(pool, "t"), startup_timeout=WAIT_S) as base:
        ours, (theirs,) = pool.cores
        (child,) = pool._children
        assert os.sched_getaffinity(child.process.pid) == set(theirs) and os.sched_getaffinity(0) == set(ours)
        assert not set(ours) & set(theirs) and set(ours) | set(theirs) == before
        reply = httpx2.post(base + CHAT, json=request(max_tokens=3), timeout=WAIT_S)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    assert os.sched_getaffinity(0) == before and pool.cores is None  # given back when the pool stopped
