"""`nanochat serve`: the web chat page at / and an OpenAI-compatible API at /v1.

Endpoints: POST /v1/chat/completions (streamed as server-sent events or not), GET /v1/models,
GET /health, GET /metrics (Prometheus). Requests are validated before they reach a worker
(workers.py): a request becomes a prompt (the chat format's render_for_completion) and one
`Sampling`, which goes unchanged through the job queue to the engine. Every error is answered in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, so OpenAI clients show it as they would show
OpenAI's own. The command's options are config.ServeConfig.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from nanochat.chat_format import render_for_completion
from nanochat.checkpoint import read_meta
from nanochat.config import ServeConfig, parse_config
from nanochat.engine import Engine, Sampling
from nanochat.runs import checkpoint_tokenizer, display_name, find_model
from nanochat.runtime import Runtime, pick_device, pick_dtype
from nanochat.serve.metrics import CountStatus, ServerMetrics
from nanochat.serve.processes import ProcessPool, engine_makers
from nanochat.serve.workers import Finished, GenerationFailed, Job, Overloaded, WorkerPool
from nanochat.tokenizer import Tokenizer, TokenizerError

STATIC = Path(__file__).parent / "static"
MAX_MESSAGES = 512
MAX_MESSAGE_CHARS = 100_000
MAX_TOTAL_CHARS = 200_000  # tokenizing runs on the event loop: keep one request's share of it small
DEFAULT_MAX_TOKENS = 512

# ---------------------------------------------------------------------------------------------
# Requests


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)

    @field_validator("content", mode="before")
    @classmethod
    def join_text_parts(cls, content):
        """OpenAI also allows content as a list of parts; this model can read only the text ones."""
        if not isinstance(content, list):
            return content
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ValueError('content parts must all be {"type": "text", "text": "..."}: this model reads text only')
        return "\n".join(p["text"] for p in content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that this server honours, plus top_k.
    Others (model, user, ...) are accepted and ignored: there is one model to talk to."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are given."""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=64)
    """Choices of the one prompt, sharing its prefill (continuous batching; at most --max-batch)."""
    seed: int | None = Field(None, ge=0, lt=2**63 - 64)
    stop: str | list[str] | None = None
    """Up to 4 strings; the reply ends before the first of them and never contains it."""

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings (got {len(stops)})")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def total_size(self):
        chars = sum(len(m.content) for m in self.messages)
        if chars > MAX_TOTAL_CHARS:
            raise ValueError(f"the messages hold {chars} characters; the limit is {MAX_TOTAL_CHARS}")
        return self


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, self.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem pydantic found, named by where it is (`messages.0.role: ...`)."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first['ctx']['error']})")
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    message = f"{param or 'request body'}: {first['msg'].removeprefix('Value error, ')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(400, message, param=param)


def _prepare(req: ChatRequest, tok: Tokenizer, context: int) -> tuple[list[int], Sampling]:
    """The prompt's tokens and how to sample the reply, or a 400 saying what does not fit."""
    if req.messages[-1].role != "user":
        raise ApiError(400, "messages: the last message must be the user's (the reply answers it)", param="messages")
    try:
        prompt = render_for_completion(tok, [m.model_dump() for m in req.messages])
    except TokenizerError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    room = context - len(prompt)
    asked = req.max_completion_tokens or req.max_tokens
    if asked is None and room < 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens, which leaves no room for a reply in the model's "
                            f"context of {context} tokens; shorten the conversation", param="messages",
                       code="context_length_exceeded")
    if asked is not None and asked > room:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens and max_tokens is {asked}: together "
                            f"{len(prompt) + asked}, more than the model's context of {context} tokens; lower "
                            "max_tokens or shorten the conversation", param="max_tokens",
                       code="context_length_exceeded")
    sampling = Sampling(
        max_tokens=asked or min(DEFAULT_MAX_TOKENS, room),
        temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's default
        top_k=req.top_k,
        top_p=req.top_p,
        seed=secrets.randbits(63) if req.seed is None else req.seed,
    )
    return prompt, sampling


# ---------------------------------------------------------------------------------------------
# Responses


@dataclass
class Reply:
    """The envelope every object of one completion shares."""

    model: str
    prompt_tokens: int
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, object: str) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}

    def usage(self, results: Sequence[Finished]) -> dict:
        """Token counts, the completion tokens of every choice together."""
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def completion(self, texts: Sequence[str], results: Sequence[Finished]) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": result.reason}
                   for i, (text, result) in enumerate(zip(texts, results, strict=True))]
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(results)}

    def chunk(self, delta: dict, finish_reason: str | None = None, index: int = 0) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, results: Sequence[Finished]) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage(results)}


class StopText:
    """A reply's text with the stop strings applied: text that might be the start of a stop string
    is held back until the next pieces decide it; at the first stop string the reply ends, without it."""

    def __init__(self, stops: Sequence[str] | None):
        self.stops, self.held, self.stopped = list(stops or []), "", False

    def feed(self, piece: str) -> str:
        """What of the text so far can be shown now."""
        if self.stopped:
            return ""
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held, self.stopped = "", True
            return text[:min(found)]
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back text once the reply has ended without a stop string."""
        tail, self.held = ("" if self.stopped else self.held), ""
        return tail


async def _reply_events(pool: WorkerPool, job: Job, stops: Sequence[str], metrics: ServerMetrics,
                        arrived: float) -> AsyncIterator[tuple[int, str | Finished]]:
    """(choice, text) as each reply is written, with `stops` applied, then (choice, how it finished).
    At a stop string that choice is stopped (its slot freed at the next step) and its end still
    awaited, so its token count is what was generated. Records the time to first token, the gaps
    between pieces and the completion tokens."""
    texts, last = [StopText(stops) for _ in range(job.n)], None
    async for item in job.events():
        if isinstance(item, Finished):
            i, text = item.index, texts[item.index]
            tail = text.flush()
            if tail:
                yield i, tail
            metrics.completion_tokens.inc(item.completion_tokens)
            job.results[i] = Finished("stop", item.completion_tokens, i) if text.stopped else item
            yield i, job.results[i]
            continue
        i, piece = item
        now = time.perf_counter()
        if last is None:
            metrics.ttft.observe(now - arrived)
        else:
            metrics.itl.observe(now - last)
        last = now
        was_stopped = texts[i].stopped
        shown = texts[i].feed(piece)
        if shown:
            yield i, shown
        if texts[i].stopped and not was_stopped:
            if job.n == 1:
                pool.cancel(job)
            else:
                pool.stop_choice(job, i)


# Characters that str.splitlines (and so httpx's iter_lines) takes for line ends, which JSON leaves
# raw when not ASCII-escaping: written as \u escapes, a model's text can never cut an event's line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


async def _events(events: AsyncIterator[tuple[int, str | Finished]], job: Job, reply: Reply,
                  include_usage: bool) -> AsyncIterator[str]:
    """The chunks of a streamed completion: each choice's role, its text piece by piece, its finish reason."""
    for i in range(job.n):
        yield _sse(reply.chunk({"role": "assistant", "content": ""}, index=i))
    try:
        async for i, item in events:
            yield _sse(reply.chunk({"content": item}, index=i) if isinstance(item, str)
                       else reply.chunk({}, item.reason, index=i))
    except GenerationFailed as e:  # the status line is long gone: report it in the stream, as OpenAI does
        yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        return
    if include_usage:
        yield _sse(reply.usage_chunk(job.results))
    yield _sse("[DONE]")


class JobStream(StreamingResponse):
    """A streamed completion that cancels its job however the response ends, so a client that
    disconnects frees its worker (or its place in the queue) at once."""

    def __init__(self, pool: WorkerPool, job: Job, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.pool, self.job = pool, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.pool.cancel(self.job)


class RequireApiKey:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <key>`. The page and /health stay open
    (the page asks for the key itself). Checked before the body is read, so a stranger's request
    costs nothing."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (scope["path"] + "/").startswith("/v1/"):
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if not (scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key)):
                message = ("this server needs an API key: send `Authorization: Bearer <key>`" if not token
                           else "incorrect API key")
                error = ApiError(401, message, code="invalid_api_key")
                await error.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# The app


def create_app(workers: Engine | Sequence[Engine] | WorkerPool, model_name: str, *, api_key: str | None = None,
               max_queue: int = 64, max_batch: int = 8, batching: str = "continuous") -> FastAPI:
    """The server over a pool of workers: `workers` engines, one worker thread each in this process
    (repeat an engine to share its model), each writing up to `max_batch` replies at once; or a pool
    built already (`nanochat serve`: a processes.ProcessPool, which has its own queue and batch
    settings). Workers start (if they have not) and stop with the app's lifespan, which uvicorn runs."""
    if isinstance(workers, WorkerPool):
        pool = workers
    else:
        engines = [workers] if isinstance(workers, Engine) else list(workers)
        for engine in engines:
            # Engine.generate (gpt.eval_mode) restores the train/eval mode it found; with threads sharing
            # a model that restore would race, so the models are put in eval mode for good.
            engine.model.eval()
        pool = WorkerPool(engines, max_queue, max_batch, batching)
    tok = pool.tok
    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "nanochat"}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        pool.start()
        try:
            yield
        finally:
            pool.stop()

    app = FastAPI(title="nanochat", summary="OpenAI-compatible chat API", lifespan=lifespan)
    app.state.pool = pool
    metrics = ServerMetrics(pool.stats)
    app.add_middleware(CountStatus, metrics=metrics)
    if api_key:
        app.add_middleware(RequireApiKey, key=api_key)
    _add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            return PlainTextResponse(f"the chat page is missing ({page}); the API is at /v1", 404)
        return FileResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **pool.stats()}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != model_name:
            raise ApiError(404, f"no model {model_id!r}; this server has {model_name!r}", param="model",
                           code="model_not_found")
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        arrived = time.perf_counter()
        prompt, sampling = _prepare(req, tok, pool.context)
        try:
            job = pool.submit(prompt, sampling, req.n or 1)
        except Overloaded as e:
            raise ApiError(503, f"server overloaded: {e}", type="server_error", code="overloaded") from None
        except ValueError as e:
            raise ApiError(400, f"n: {e}", param="n") from None
        metrics.prompt_tokens.inc(len(prompt))
        reply = Reply(model_name, len(prompt))
        events = _reply_events(pool, job, req.stop, metrics, arrived)
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return JobStream(pool, job, _events(events, job, reply, include_usage))
        texts = [""] * job.n
        try:
            async for i, item in events:
                if isinstance(item, str):
                    texts[i] += item
        except GenerationFailed as e:
            raise ApiError(500, str(e), type="server_error") from None
        finally:
            pool.cancel(job)  # a no-op once finished; frees the worker if this request was abandoned
        return reply.completion(texts, job.results)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: validation (400), routing (404, 405), our own, and bugs (500)."""

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if exc.status_code == 400:  # FastAPI could not read the body (bad JSON is a validation error instead)
            try:
                (await request.body()).decode("utf-8")
            except UnicodeDecodeError as e:
                return ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}): send JSON in "
                                "UTF-8").response()
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return ApiError(exc.status_code, message).response(exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


# ---------------------------------------------------------------------------------------------
# nanochat serve


def engine_pool(cfg: ServeConfig) -> tuple[ProcessPool, str, str]:
    """The engine processes `nanochat serve` runs (one per CUDA GPU, else --workers), not started;
    the model's display name; and the device type. The device and dtype are picked here but used
    only in the engine processes (init_runtime would also make the device current here: a CUDA
    context this process never uses)."""
    device = pick_device(cfg.source.runtime.device)
    rt = Runtime(device, pick_dtype(device, cfg.source.runtime.dtype))
    path, name = find_model(cfg.source.run, cfg.source.stage, cfg.source.checkpoint)
    meta = read_meta(path)
    pool = ProcessPool(engine_makers(cfg.source, rt, cfg.workers), checkpoint_tokenizer(path, meta), cfg.max_queue,
                       cfg.max_batch, cfg.batching, cfg.prefill_chunk, cfg.threads,
                       pin=cfg.pin_cores and rt.device.type == "cpu")
    return pool, display_name(name, meta), rt.device.type


def cli(argv: list[str]) -> int:
    cfg = parse_config(ServeConfig, argv, prog="nanochat serve",
                       description="Chat with a trained model in the browser, or through the OpenAI-compatible "
                                   "API at /v1 (any OpenAI client: base_url=http://HOST:PORT/v1).")
    pool, name, device = engine_pool(cfg)
    api_key = cfg.api_key or os.environ.get("NANOCHAT_API_KEY", "")
    print(f"nanochat serve: loading {name} in {pool.workers} {device} engine process(es), {pool.threads} thread(s) "
          "each…", flush=True)
    pool.start()
    if pool.cores is not None:
        ours, theirs = pool.cores
        cores = " | ".join(",".join(map(str, each)) for each in theirs)
        print(f"nanochat serve: engine process(es) pinned to core(s) {cores}; the HTTP server to "
              f"{','.join(map(str, ours))} (--no-pin-cores: the OS places them)", flush=True)
    try:
        app = create_app(pool, name, api_key=api_key or None)
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        url = f"http://{host}:{cfg.port}"
        print(f"nanochat serve: {name}, {cfg.batching} batches of up to {cfg.max_batch} per process"
              + ("; /v1 needs the API key" if api_key else ""))
        print(f"  chat:  {url}/\n  API:   {url}/v1  (OpenAI-compatible)", flush=True)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    finally:
        pool.stop()
    return 0
