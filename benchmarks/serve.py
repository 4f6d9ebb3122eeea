"""Serving under load: continuous batching against the static batcher, the same load for both.

    uv run python benchmarks/serve.py                        # run `tiny` (after `nanochat speedrun`)
    uv run python benchmarks/serve.py --rates 1 2 4 8 --seconds 30

Each batching mode is a real `nanochat serve` process (one worker, --max-batch 8) on a loopback
port, both started before the first rate and warmed up with one request; the rates then take turns
between them, so a drift in the machine's speed hits both alike. The load generator runs in this
process, not the servers': its Python (streaming, JSON) does not compete with theirs for a GIL, as
no real client would, and it keeps to the cores the servers keep for HTTP (processes.core_plan),
off the engines' own, as clients on other machines would. It is bounded and open-loop: arrivals
are a Poisson process at each --rates (requests per second) for --seconds, each request a prompt
drawn from a fixed mix (short questions, arithmetic, long multi-turn conversations) and a
max_tokens drawn from --max-tokens, with its own seed. The arrival times, prompts, budgets and
seeds are the same for both modes (one random stream per rate), so each row compares like with
like.

Measured per mode and rate: throughput (completion tokens, from each stream's usage, per second of
wall-clock from the first request to the last reply), time to first token (request sent to first
content chunk), inter-token latency (between consecutive content chunks of one stream), p50 and
p99, and requests completed. Clients give up on a request after --timeout seconds: a mode that
cannot keep up shows it as timeouts, and its row does not count as sustained.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx2

from nanochat.serve.processes import core_plan, default_threads, pin_process, usable_cores

PROMPTS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "What is 37 times 48?"}],
    [{"role": "user", "content": "Spell the word 'banana' letter by letter."}],
    [{"role": "user", "content": "Tell me about the history of Paris."}],
    [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "The answer is 42."},
     {"role": "user", "content": "And what do you know about the Moon and the planets of the solar system? "
                                 "Please explain what makes them different from one another."}],
]


@dataclass
class Result:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: bool = False


def schedule(rate: float, seconds: float, token_mix: list[int], seed: int,
             top_k: int | None = None) -> list[tuple[float, dict]]:
    """(send time, request body) of every request at one arrival rate: the same for every mode."""
    r = random.Random(f"serve-bench/{rate}/{seed}")
    t, out = 0.0, []
    while True:
        t += r.expovariate(rate)
        if t > seconds:
            return out
        body = {"model": "m", "messages": r.choice(PROMPTS), "stream": True, "max_tokens": r.choice(token_mix),
                "temperature": 0.8, "seed": r.randrange(2**31), "stream_options": {"include_usage": True}}
        if top_k:
            body["top_k"] = top_k
        out.append((t, body))


async def one(client: httpx2.AsyncClient, start: float, at: float, body: dict, timeout: float) -> Result:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    result, sent = Result(), time.perf_counter()
    last = None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return result
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        result.tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        now = time.perf_counter()
                        if last is None:
                            result.ttft = now - sent
                        else:
                            result.gaps.append(now - last)
                        last = now
        result.ok = True
    except TimeoutError:
        pass
    return result


async def load(base: str, requests: list[tuple[float, dict]], timeout: float) -> tuple[list[Result], float]:
    limits = httpx2.Limits(max_connections=len(requests) + 1)
    async with httpx2.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, start, at, body, timeout) for at, body in requests))
        return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@contextlib.contextmanager
def server(run: str, batching: str, max_batch: int, startup_timeout: float = 120.0) -> Iterator[str]:
    """A `nanochat serve` process for `run` on a free loopback port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "import sys; from nanochat.cli import main; sys.exit(main())", "serve",
           "--run", run, "--device", "cpu", "--port", str(port), "--batching", batching,
           "--max-batch", str(max_batch), "--max-queue", "100000"]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                with contextlib.suppress(httpx2.TransportError):
                    if httpx2.get(f"{base}/health", timeout=5).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"`nanochat serve --batching {batching}` did not start:\n{log.read()[-3000:]}")
                time.sleep(0.25)
            warm = {"model": "m", "messages": PROMPTS[0], "max_tokens": 8}
            httpx2.post(f"{base}/v1/chat/completions", json=warm, timeout=60).raise_for_status()
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="tiny")
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long requests keep arriving, per rate")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=None,
                        help="top_k in every request (default: none, as OpenAI's clients send: the sampler then "
                             "sorts the whole vocabulary)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each rate, the modes taking turns; the table shows each figure's median")
    args = parser.parse_args()
    modes = ("static", "continuous")
    runs: dict[tuple[float, str], list[tuple]] = {}
    with contextlib.ExitStack() as stack:
        bases = {batching: stack.enter_context(server(args.run, batching, args.max_batch)) for batching in modes}
        health = httpx2.get(f"{bases['static']}/health").json()
        plan = core_plan(usable_cores(), 1, default_threads(1))  # what each server did with its engine
        if plan is not None:
            pin_process(plan[0])
        for rate in args.rates:
            requests = schedule(rate, args.seconds, args.max_tokens, args.seed, args.top_k)
            for repeat in range(args.repeats):
                for batching in modes:
                    results, wall = asyncio.run(load(bases[batching], requests, args.timeout))
                    done = [r for r in results if r.ok]
                    ttft = [r.ttft for r in done if r.ttft is not None]
                    gaps = [g for r in done for g in r.gaps]
                    runs.setdefault((rate, batching), []).append(
                        (len(done), sum(r.tokens for r in done) / wall, pct(ttft, 0.5), pct(ttft, 0.99),
                         pct(gaps, 0.5), pct(gaps, 0.99)))
                    print(f"rate {rate:g}/s, {batching}, run {repeat + 1}: {len(done)}/{len(requests)} completed, "
                          f"{runs[rate, batching][-1][1]:.0f} tok/s", flush=True)
    print(f"\nnanochat serve, {health['model']}, CPU, one engine process each, --max-batch {args.max_batch}; "
          f"{args.seconds:g} s of Poisson arrivals per rate, max_tokens from {args.max_tokens}"
          + (f", top_k {args.top_k}" if args.top_k else "")
          + (f"; medians of {args.repeats} runs" if args.repeats > 1 else "") + "\n")
    print("| rate (req/s) | batching | completed | completion tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) "
          "| ITL p99 (ms) | throughput vs static |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for (rate, batching), figures in runs.items():
        sent = len(schedule(rate, args.seconds, args.max_tokens, args.seed))
        done, tps, t50, t99, i50, i99 = (statistics.median(column) for column in zip(*figures, strict=True))
        static = statistics.median(f[1] for f in runs[rate, "static"])
        each = "" if len(figures) == 1 else " (" + ", ".join(
            f"{c[1] / s[1]:.2f}" for c, s in zip(figures, runs[rate, "static"], strict=True)) + ")"
        print(f"| {rate:g} | {batching} | {done:g}/{sent} | {tps:.1f} | {t50:.2f} | {t99:.2f} | {1000 * i50:.0f} | "
              f"{1000 * i99:.0f} | {tps / static:.2f}×{each if batching != 'static' else ''} |")


if __name__ == "__main__":
    main()
