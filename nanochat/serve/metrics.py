"""The server's Prometheus metrics (GET /metrics, prometheus-client's text format), one registry
per app so several apps in one process (tests, benchmarks) keep their own counts."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; from a few milliseconds (a warm CPU decode step) to a minute (a long queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nanochat_requests", "Chat completion requests answered, by HTTP status",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("nanochat_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("nanochat_completion_tokens", "Completion tokens generated", registry=r)
        self.ttft = Histogram("nanochat_time_to_first_token_seconds", "From a request's arrival to its first text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("nanochat_inter_token_latency_seconds", "Between consecutive pieces of one reply",
                             buckets=LATENCY_BUCKETS, registry=r)
        Gauge("nanochat_queue_length", "Requests waiting for a worker", registry=r).set_function(
            lambda: stats()["waiting"])
        Gauge("nanochat_running_batch_size", "Replies being written now, over all workers", registry=r).set_function(
            lambda: stats()["busy"])


class CountStatus:
    """ASGI middleware: counts the responses of POST /v1/chat/completions by status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
