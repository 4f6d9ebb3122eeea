"""Generation off the event loop: a pool of worker threads, one per engine, fed from one queue.
`nanochat serve` runs this pool inside each engine process (processes.py); `create_app` over
engines runs it in the server's own process (tests, and Python users).

A request becomes a Job, which carries its request's `Sampling` (settings and seed); its reply
does not depend on its neighbours. A worker batches in one of two ways (`batching`):

- continuous: the worker keeps up to `max_batch` replies in flight (engine.ContinuousBatch). Before
  every decode step it admits waiting jobs into free slots (their prompts are prefilled in that
  step's forward pass, beside the running replies' tokens), and a reply that ends leaves at once,
  freeing its slot: a request never waits for a batch to finish.
- static: the worker takes the oldest waiting job with whatever else is waiting (up to `max_batch`
  jobs whose prompts and budgets fit the context side by side) and writes them in one batched
  generation (Engine.generate) until the last ends; jobs that arrive meanwhile wait for the next
  batch. Kept as the benchmark's peer (benchmarks/serve.py).

Admission is counted, not left to the queue: `max_queue` jobs may wait beyond those an idle worker
will take at once, and a request beyond that is refused at once (the server answers 503) instead
of piling up. A worker streams each job's text back to the event loop through an asyncio queue,
and stops writing a job whose client went away (the whole batch, once every client has gone).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import torch

from nanochat.chat_format import ReplyText
from nanochat.engine import ContinuousBatch, Engine, Sampling
from nanochat.tokenizer import Tokenizer

log = logging.getLogger("nanochat.serve")


class Overloaded(Exception):
    """Every worker is busy and the waiting queue is full."""


class GenerationFailed(Exception):
    """The engine raised while writing a reply (a bug, or the device ran out of memory)."""


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (the model ended its turn, or a stop string came) or "length" (max_tokens ran out)
    completion_tokens: int
    index: int = 0  # which choice of the job


@dataclass(frozen=True)
class LoopOutlet:
    """Where the events of jobs waited for in this process go: their event loop, which takes a
    batch of them in one wake-up. (A job in an engine process has a pipe to the server instead:
    processes.PipeOutlet.)"""

    loop: asyncio.AbstractEventLoop

    def deliver(self, batch: list[tuple[Job, object]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the loop is closed: the server stopped, nobody is listening
            for job, _ in batch:
                job.cancelled.set()


class Job:
    """One request to answer: the prompt, how to sample it, how many choices (`n`, continuous
    batching: they share the prompt's prefill; choice i samples with seed + i), and the outlet its
    events go to (the event loop that waits for it)."""

    def __init__(self, prompt: list[int], sampling: Sampling, outlet: LoopOutlet, n: int = 1, id: int = 0):
        self.prompt, self.sampling, self.n, self.id = prompt, sampling, n, id
        self.cancelled = threading.Event()
        self.stopped: set[int] = set()  # choices the client needs no more of (a stop string came)
        self.state = "waiting"  # -> "running" -> "done"; guarded by the pool's lock
        self.results: list[Finished | None] = [None] * n
        self.outlet, self._events = outlet, asyncio.Queue()

    def emit(self, item: tuple[int, str] | Finished | GenerationFailed) -> None:
        """Hand an item to the event loop (called from the worker thread): (choice, text), a choice's end,
        or the failure of the whole job."""
        emit_all([(self, item)])

    async def events(self) -> AsyncIterator[tuple[int, str] | Finished]:
        """(choice, text) as the replies are written and each choice's Finished, until all have
        finished; raises GenerationFailed if the job failed. Pieces that queued up while the event
        loop was busy come out joined, one piece per choice: under load the server then writes one
        chunk for several tokens instead of one each, and a client that keeps up still gets every
        token on its own."""
        done = 0
        while done < self.n:
            items = [await self._events.get()]
            while not self._events.empty():
                items.append(self._events.get_nowait())
            for item in _joined(items):
                if isinstance(item, GenerationFailed):
                    raise item
                if isinstance(item, Finished):
                    self.results[item.index] = item
                    done += 1
                yield item


def _joined(items: list) -> list:
    """Consecutive text pieces of one choice joined into one piece; everything else as it is."""
    out: list = []
    for item in items:
        if isinstance(item, tuple) and out and isinstance(out[-1], tuple) and out[-1][0] == item[0]:
            out[-1] = (item[0], out[-1][1] + item[1])
        else:
            out.append(item)
    return out


def emit_all(items: Sequence[tuple[Job, tuple[int, str] | Finished | GenerationFailed]]) -> None:
    """Hand items to their jobs' outlets, from a worker thread: one delivery to each outlet for all
    of them (a decode step's tokens for every running job), not one per item."""
    by_outlet: dict[LoopOutlet, list] = {}
    for job, item in items:
        by_outlet.setdefault(job.outlet, []).append((job, item))
    for outlet, batch in by_outlet.items():
        if batch:
            outlet.deliver(batch)


def _post(job: Job, item, outbox: list | None) -> None:
    """Send `item` to `job` now, or add it to `outbox` (sent later, with emit_all)."""
    if outbox is None:
        emit_all([(job, item)])
    else:
        outbox.append((job, item))


def _deliver(batch: list[tuple[Job, object]]) -> None:
    for job, item in batch:
        job._events.put_nowait(item)


class WorkerPool:
    """One thread per entry of `engines` (an engine may appear several times: threads sharing a
    model on the CPU), each writing up to `max_batch` replies at once, first come, first served.
    `prefill_chunk`: prompt tokens a continuous batch's step may carry. `on_started` is told of the
    jobs a worker takes (an engine process reports them to the server)."""

    def __init__(self, engines: Sequence[Engine], max_queue: int, max_batch: int = 8, batching: str = "continuous",
                 prefill_chunk: int = 512, on_started: Callable[[list[Job]], None] | None = None):
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', not {batching!r}")
        self.engines, self.max_queue, self.max_batch, self.batching = list(engines), max_queue, max_batch, batching
        self.workers, self.prefill_chunk, self.on_started = len(self.engines), prefill_chunk, on_started
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = self._busy = self._busy_workers = 0
        self._threads: list[threading.Thread] = []

    @property
    def tok(self) -> Tokenizer:
        return self.engines[0].tok

    @property
    def context(self) -> int:
        """Most tokens one sequence (prompt and reply) may hold."""
        return self.engines[0].context

    def start(self) -> None:
        work = self._work_continuous if self.batching == "continuous" else self._work
        self._threads = [threading.Thread(target=work, args=(engine,), name=f"nanochat-worker-{i}",
                                          daemon=True) for i, engine in enumerate(self.engines)]
        for thread in self._threads:
            thread.start()

    def stop(self, wait: float | None = None) -> None:
        """Let each worker finish its current batch, then exit; with `wait`, wait up to that many
        seconds for each."""
        for _ in self._threads:
            self._jobs.put(None)
        if wait is not None:
            for thread in self._threads:
                thread.join(wait)
        self._threads = []

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"workers": self.workers, "max_batch": self.max_batch, "busy": self._busy,
                    "waiting": self._waiting, "max_queue": self.max_queue}

    def submit(self, prompt: list[int], sampling: Sampling, n: int = 1) -> Job:
        """Queue a job of `n` choices (call from the event loop), or raise Overloaded when there is no room."""
        if n > 1 and (self.batching != "continuous" or n > self.max_batch):
            raise ValueError(f"n = {n} needs continuous batching with --max-batch ≥ n (here: {self.batching}, "
                             f"--max-batch {self.max_batch})")
        job = Job(prompt, sampling, LoopOutlet(asyncio.get_running_loop()), n)
        self.add(job)
        return job

    def add(self, job: Job, limit: bool = True) -> None:
        """Count `job` as waiting and hand it to the workers; with `limit`, raise Overloaded instead
        when the queue is full."""
        with self._lock:
            idle_workers = self.workers - self._busy_workers
            if limit and self._waiting >= self.max_queue + idle_workers:
                raise Overloaded(f"all {self.workers} workers are busy and {self._waiting} requests are "
                                 "already waiting; try again shortly")
            self._waiting += 1
        self.put(job)

    def put(self, job: Job) -> None:
        """Hand a counted job to the workers."""
        self._jobs.put(job)

    def stop_choice(self, job: Job, index: int) -> None:
        """The client needs no more of choice `index` (a stop string came): its slot frees at the next step."""
        job.stopped.add(index)

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one gives its place back now, a running one stops at its next
        token. Does nothing to a finished job."""
        job.cancelled.set()
        with self._lock:
            if job.state == "waiting":
                job.state = "done"
                self._waiting -= 1

    def _work(self, engine: Engine) -> None:
        if engine.rt.device.type == "cuda":
            torch.cuda.set_device(engine.rt.device)  # the current device is per thread
        held: Job | None = None  # a job that did not fit beside the last batch: first in the next
        stopping = False
        while not stopping:
            first = held or self._jobs.get()
            if first is None:
                return
            batch, held = [first], None
            while len(batch) < self.max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:  # stop after this batch
                    stopping = True
                    break
                if not _fits(engine, [*batch, job]):
                    held = job
                    break
                batch.append(job)
            with self._lock:
                batch = [job for job in batch if job.state == "waiting"]  # drop those cancelled while waiting
                for job in batch:
                    job.state = "running"
                self._waiting -= len(batch)
                self._busy += len(batch)
                self._busy_workers += bool(batch)
            if batch and self.on_started:
                self.on_started(batch)
            if batch:
                self._run(engine, batch)
                with self._lock:
                    self._busy_workers -= 1

    def _take(self, job: Job) -> bool:
        """Move a job from waiting to running (False: it was cancelled while it waited)."""
        with self._lock:
            if job.state != "waiting":
                return False
            job.state = "running"
            self._waiting -= 1
            self._busy += 1
        if self.on_started:
            self.on_started([job])
        return True

    def _work_continuous(self, engine: Engine) -> None:
        if engine.rt.device.type == "cuda":
            torch.cuda.set_device(engine.rt.device)
        try:
            batch = ContinuousBatch(engine, self.max_batch, prefill_chunk=self.prefill_chunk)
        except Exception:  # a model that cannot keep a slot cache is still served, by the static batcher
            log.exception("continuous batching is not available for this model; batching statically")
            self._work(engine)
            return
        running: dict[int, tuple[Job, int, ReplyText]] = {}  # slot -> its job, choice and the text so far
        left: dict[Job, int] = {}  # choices of each running job still being written
        held: Job | None = None  # taken from the queue, waiting for enough free slots for its choices
        stopping = busy = False

        def end_choice(slot: int, outcome: Finished, outbox: list | None = None) -> None:
            job = running.pop(slot)[0]
            batch.release(slot)
            if left[job] > 1:
                _post(job, outcome, outbox)
            else:
                self._finish(job, outcome, outbox)  # the job's last choice: its place frees
            left[job] -= 1
            if not left[job]:
                del left[job]

        while running or held or not stopping:
            admitting: list[Job] = []  # jobs taken now: prefilled in the next step's forward pass
            while not stopping or held:  # block for a job only when nothing is running or admitted
                try:
                    job = held or (self._jobs.get_nowait() if running or admitting else self._jobs.get())
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    continue
                if job.n > batch.free - sum(j.n for j in admitting):
                    held = job
                    break
                held = None
                if self._take(job):
                    admitting.append(job)
            if admitting:
                if not busy:
                    busy = True
                    with self._lock:
                        self._busy_workers += 1
                try:
                    slots = batch.admit_many([(job.prompt, job.sampling, job.n) for job in admitting])
                except Exception as e:
                    log.exception("admission failed")
                    for job in admitting:
                        self._finish(job, GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
                else:
                    for job, job_slots in zip(admitting, slots, strict=True):
                        left[job] = job.n
                        for i, slot in enumerate(job_slots):
                            running[slot] = (job, i, ReplyText(engine.tok))
            for slot, (job, i, text) in list(running.items()):
                if job.cancelled.is_set() or i in job.stopped:  # nobody wants the rest: free the slot now
                    end_choice(slot, Finished(text.finish_reason, len(text.tokens), i))
            try:
                steps = batch.step() if running else []
            except Exception as e:
                log.exception("generation failed")
                for slot, (job, _, _) in list(running.items()):
                    batch.release(slot)
                    if job in left:
                        del left[job]
                        self._finish(job, GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
                running.clear()
                steps = []
            outbox: list[tuple[Job, tuple[int, str] | Finished]] = []  # the step's news, sent together
            for slot, token, done in steps:
                job, i, text = running[slot]
                piece = text.feed(token) + (text.flush() if done else "")
                if piece:
                    outbox.append((job, (i, piece)))
                if done:
                    end_choice(slot, Finished(text.finish_reason, len(text.tokens), i), outbox)
            emit_all(outbox)
            if busy and not running:
                busy = False
                with self._lock:
                    self._busy_workers -= 1

    def _finish(self, job: Job, outcome: Finished | GenerationFailed, outbox: list | None = None) -> None:
        """End a job: its place frees before its client hears the end (at once, or with `outbox`), so
        the client's next request finds room."""
        with self._lock:
            job.state = "done"
            self._busy -= 1
        _post(job, outcome, outbox)

    def _run(self, engine: Engine, batch: list[Job]) -> None:
        """Write every reply of `batch` in one generation; each job ends as soon as its reply does."""
        texts = [ReplyText(engine.tok) for _ in batch]
        sampling = [job.sampling for job in batch]
        live = set(range(len(batch)))
        try:
            steps = engine.generate([job.prompt for job in batch], sampling)
            for step in steps:
                for i in list(live):
                    job, text = batch[i], texts[i]
                    if not job.cancelled.is_set():
                        piece = text.feed(step[i])
                        ended = text.finish_reason == "stop" or len(text.tokens) == sampling[i].max_tokens
                        if ended:
                            piece += text.flush()
                        if piece:
                            job.emit((0, piece))
                        if not ended:
                            continue
                    live.discard(i)
                    self._finish(job, Finished(text.finish_reason, len(text.tokens)))
                if not live:
                    steps.close()  # everyone is answered or gone: stop the batch now
        except Exception as e:
            log.exception("generation failed")
            for i in live:
                self._finish(batch[i], GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))


def _fits(engine: Engine, jobs: list[Job]) -> bool:
    """Whether `jobs` can share one batch: rows are padded to the longest prompt and run for the
    largest budget, which must fit the model's context together."""
    width = max(len(job.prompt) for job in jobs)
    budget = max(job.sampling.max_tokens for job in jobs)
    return width + budget <= engine.context
