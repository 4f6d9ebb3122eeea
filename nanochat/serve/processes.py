"""Engines in processes of their own: what `nanochat serve` runs, so that the server's event loop
and a decode loop never share a GIL.

A decode step of a small model is mostly Python (a few hundred small tensor operations), and in
one process the event loop's share of every streamed token (the ASGI stack, SSE framing, socket
writes) is taken from the decode loop, turn by turn on the GIL: the whole server process never
used more than one core. Measured on the tiny model at 32 requests/s with one thread: a continuous
step took 10.4 ms in a one-process server (9.2 ms when the same requests did not stream) against
8.1-8.7 ms on its own; in an engine process it takes what it takes on its own, and the server's
throughput rose by a third (benchmarks/README.md, Serving).

Each child process builds its engine (`make_engine`, a picklable callable: load_engine with the
model source and runtime) and runs the same WorkerPool as the in-process server, with one
thread. The server side, ProcessPool, keeps what the in-process pool keeps (the admission counts
behind 503, /health and /metrics) and talks to each child over a pipe: a job (its id, prompt,
sampling and n), a cancellation or a stopped choice goes down; the jobs a child takes, and each
decode step's events (text pieces, finished choices, failures) in one message, come up, and a
reader thread hands them to the event loop as the in-process workers do. A child that dies fails
its jobs with a clear error; the others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nanochat.config import ModelSource
from nanochat.engine import Engine, load_engine
from nanochat.errors import NanochatError
from nanochat.runtime import Runtime
from nanochat.serve.workers import Finished, GenerationFailed, Job, WorkerPool, emit_all
from nanochat.tokenizer import Tokenizer

log = logging.getLogger("nanochat.serve")

EngineMaker = Callable[[], tuple[Engine, str]]  # load_engine with its arguments bound


class PipeOutlet:
    """Where the events of a child's jobs go: up the pipe to the server, one message a delivery."""

    def __init__(self, conn):
        self.conn, self.lock = conn, threading.Lock()

    def send(self, message: tuple) -> None:
        with self.lock:
            self.conn.send(message)

    def deliver(self, batch: list[tuple[Job, object]]) -> None:
        self.send(("events", [(job.id, item) for job, item in batch]))


def engine_makers(source: ModelSource, rt: Runtime, workers: int) -> list[EngineMaker]:
    """What each engine process builds: the model `source` names, on `rt`'s device: one process per
    CUDA GPU, else `workers` of them."""
    if rt.device.type == "cuda":
        return [functools.partial(load_engine, source, dataclasses.replace(rt, device=torch.device("cuda", i)))
                for i in range(torch.cuda.device_count())]
    return [functools.partial(load_engine, source, rt)] * workers


def _child(make_engine: EngineMaker, conn, max_batch: int, batching: str, prefill_chunk: int, threads: int,
           cores: list[int] | None) -> None:
    """An engine process: keep to `cores` (None: wherever the OS puts it), build the engine, say
    "ready" (or why not), then take jobs from the pipe until told to stop or the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it stops us
    if cores is not None:
        pin_process(cores)
    torch.set_num_threads(threads)
    outlet = PipeOutlet(conn)
    try:
        engine, _ = make_engine()
        engine.model.eval()
    except Exception as e:
        outlet.send(("failed", f"{type(e).__name__}: {e}"))
        return
    pool = WorkerPool([engine], max_queue=0, max_batch=max_batch, batching=batching, prefill_chunk=prefill_chunk,
                      on_started=lambda jobs: outlet.send(("started", [job.id for job in jobs])))
    pool.start()
    outlet.send(("ready", engine.context))
    jobs: weakref.WeakValueDictionary[int, Job] = weakref.WeakValueDictionary()  # each gone once finished
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            break
        kind = message[0]
        if kind == "job":
            _, job_id, prompt, sampling, n = message
            job = jobs[job_id] = Job(prompt, sampling, outlet, n, id=job_id)
            pool.add(job, limit=False)  # the server has counted it
        elif kind == "cancel" and (job := jobs.get(message[1])) is not None:
            pool.cancel(job)
        elif kind == "stop_choice" and (job := jobs.get(message[1])) is not None:
            pool.stop_choice(job, message[2])
        elif kind == "stop":
            break
    # The server is gone or going: nobody waits for these replies. The worker must be out of the
    # model before the interpreter shuts down (a daemon thread halted inside a torch operation at
    # exit aborts the process: "terminate called without an active exception").
    for job in list(jobs.values()):
        pool.cancel(job)
    pool.stop(wait=60)


@dataclass(eq=False)
class _Child:
    process: multiprocessing.process.BaseProcess
    outlet: PipeOutlet
    running: int = 0  # jobs it has taken and not finished
    alive: bool = True


@dataclass
class _Sent:
    """A job handed to a child, until the child has finished it."""

    job: Job
    child: _Child
    finished: int = 0  # its choices that have ended


def usable_cores() -> list[int]:
    """The CPU cores this process may run on, in order: its affinity mask where the OS keeps one
    (Linux; in a container, its cpuset), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_threads(processes: int) -> int:
    """Intra-op threads for each of `processes` engine processes: the cores but one, which is left to
    the HTTP server (and clients on the same machine), shared out, at least one each. Measured on
    the 2-core development machine, tiny model, 48 requests/s: with PyTorch's default of 2 threads
    an engine process wrote half the tokens per second it writes with 1, since its OpenMP threads
    and the server's event loop took turns on the same cores."""
    return max(1, (len(usable_cores()) - 1) // processes)


def core_plan(cores: Sequence[int], processes: int, threads: int) -> tuple[list[int], list[list[int]]] | None:
    """Where the HTTP server and `processes` CPU engine processes of `threads` threads each run, out
    of `cores`: (the server's cores, each engine's cores). Each engine gets `threads` cores of its
    own, the last ones; the server keeps the rest (at least one). None when there are too few
    cores for that, or the OS cannot pin a process (not Linux)."""
    need = processes * threads
    if not hasattr(os, "sched_setaffinity") or len(cores) <= need:
        return None
    first = len(cores) - need
    return list(cores[:first]), [list(cores[first + i * threads:first + (i + 1) * threads]) for i in range(processes)]


def pin_process(cores: Sequence[int]) -> None:
    """Keep every thread of this process on `cores`; threads started later inherit it. (Linux pins
    one thread at a time: each of /proc/self/task in turn.)"""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]  # the calling thread
    for tid in threads:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cores)


class ProcessPool(WorkerPool):
    """WorkerPool's interface over engine processes, one per entry of `makers`, each writing up to
    `max_batch` replies at once. `tok` is the model's tokenizer, for the server's own use (prompts,
    validation); each child loads its own model and tokenizer. `threads`: each child's intra-op
    threads (0: default_threads).

    `pin` (CPU engines): each child keeps to cores of its own and this process to the others
    (core_plan), while the pool runs. Unpinned, the OS now and then runs the server's event loop
    (or a client on the same machine) on an engine's core, and that decode step waits: measured on
    the 2-core development machine, tiny model, 64 requests/s, continuous batching wrote 1.79-2.01×
    the static batcher's tokens/s over four unpinned runs, and 2.01× in each of three pinned ones."""

    def __init__(self, makers: Sequence[EngineMaker], tok: Tokenizer, max_queue: int, max_batch: int = 8,
                 batching: str = "continuous", prefill_chunk: int = 512, threads: int = 0, pin: bool = False):
        super().__init__([], max_queue, max_batch, batching, prefill_chunk)
        self.makers, self._tok = list(makers), tok
        self.workers = len(self.makers)
        self.threads = threads or default_threads(self.workers)
        self.pin = pin
        self.cores: tuple[list[int], list[list[int]]] | None = None  # (ours, each child's) while pinned
        self._unpinned: list[int] | None = None  # our cores before
        self._context: int | None = None
        self._children: list[_Child] = []
        self._sent: dict[int, _Sent] = {}  # by job id, until the job is done
        self._ids = itertools.count()

    @property
    def tok(self) -> Tokenizer:
        return self._tok

    @property
    def context(self) -> int:
        if self._context is None:
            raise RuntimeError("the engine processes have not started")
        return self._context

    def start(self) -> None:
        """Start the engine processes and wait until each has its model loaded (a no-op once started).
        Raises NanochatError with the child's own message when one cannot build its engine."""
        if self._children:
            return
        plan = core_plan(usable_cores(), self.workers, self.threads) if self.pin else None
        if self.pin and plan is None:
            log.info("engine processes not pinned: %d core(s) for %d × %d engine thread(s) and the server",
                     len(usable_cores()), self.workers, self.threads)
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or CUDA state inherited
        for i, make in enumerate(self.makers):
            here, there = spawn.Pipe()
            process = spawn.Process(target=_child, name=f"nanochat-engine-{i}", daemon=True,
                                    args=(make, there, self.max_batch, self.batching, self.prefill_chunk, self.threads,
                                          plan and plan[1][i]))
            process.start()
            there.close()
            self._children.append(_Child(process, PipeOutlet(here)))
        for child in self._children:
            try:
                kind, value = child.outlet.conn.recv()
            except (EOFError, OSError):
                child.process.join(5)
                kind, value = "failed", f"it exited with code {child.process.exitcode}"
            if kind != "ready":
                self.stop()
                raise NanochatError(f"an engine process could not start: {value}")
            self._context = value
        if plan is not None:
            self._unpinned, self.cores = usable_cores(), plan
            pin_process(plan[0])
        for child in self._children:
            threading.Thread(target=self._read, args=(child,), name=f"{child.process.name}-reader", daemon=True).start()

    def stop(self) -> None:
        """Tell each child to stop, wait for it a while, then end it."""
        for child in self._children:
            self._send(child, ("stop",))
        for child in self._children:
            child.process.join(timeout=30)
            if child.process.is_alive():
                child.process.kill()
        self._children = []
        if self._unpinned is not None:  # this process may go on (tests, Python users): give its cores back
            pin_process(self._unpinned)
            self._unpinned = self.cores = None

    def put(self, job: Job) -> None:
        """Send a counted job to the living child with the fewest unfinished jobs."""
        job.id = next(self._ids)
        with self._lock:
            load = {c: 0 for c in self._children if c.alive}  # unfinished jobs of each living child
            for sent in self._sent.values():
                load[sent.child] = load.get(sent.child, 0) + 1
            child = min(load, key=load.get, default=None)
            if child is None:
                self._done(job)
            else:
                self._sent[job.id] = _Sent(job, child)
        if child is None:
            emit_all([(job, GenerationFailed("generation failed: no engine process is running"))])
        else:
            self._send(child, ("job", job.id, job.prompt, job.sampling, job.n))

    def cancel(self, job: Job) -> None:
        super().cancel(job)
        with self._lock:
            sent = self._sent.get(job.id)
            if sent is not None and job.state == "done":  # it waited: its place is back, and its events unwanted
                del self._sent[job.id]
        if sent is not None:
            self._send(sent.child, ("cancel", job.id))

    def stop_choice(self, job: Job, index: int) -> None:
        super().stop_choice(job, index)
        sent = self._sent.get(job.id)
        if sent is not None:
            self._send(sent.child, ("stop_choice", job.id, index))

    @staticmethod
    def _send(child: _Child, message: tuple) -> None:
        try:
            child.outlet.send(message)
        except OSError:  # the child is gone: its reader fails what it had
            pass

    def _done(self, job: Job) -> None:
        """Count a job as done, waiting or running before, and forget it (call with the lock held)."""
        sent = self._sent.pop(job.id, None)
        if job.state == "running":
            self._busy -= 1
            sent.child.running -= 1
            self._busy_workers -= sent.child.running == 0
        elif job.state == "waiting":
            self._waiting -= 1
        job.state = "done"

    def _read(self, child: _Child) -> None:
        """Take a child's messages: count the jobs it starts and ends, and hand each step's events to
        their event loops (counted first, so that a client's next request finds its place free)."""
        while True:
            try:
                kind, value = child.outlet.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                if kind == "started":
                    for job_id in value:
                        sent = self._sent.get(job_id)
                        if sent is not None and sent.job.state == "waiting":
                            sent.job.state = "running"
                            self._waiting -= 1
                            self._busy += 1
                            child.running += 1
                            self._busy_workers += child.running == 1
                    continue
                batch = []
                for job_id, item in value:
                    sent = self._sent.get(job_id)
                    if sent is None:  # cancelled while it waited: nobody listens
                        continue
                    sent.finished += isinstance(item, Finished)
                    if isinstance(item, GenerationFailed) or sent.finished == sent.job.n:
                        self._done(sent.job)
                    batch.append((sent.job, item))
            emit_all(batch)
        child.process.join(5)
        with self._lock:
            child.alive = False
            lost = [sent.job for sent in self._sent.values() if sent.child is child]
            for job in lost:
                self._done(job)
        if lost:
            log.error("%s exited (code %s) with %d request(s) unfinished", child.process.name,
                      child.process.exitcode, len(lost))
        emit_all([(job, GenerationFailed(f"generation failed: the engine process exited (code "
                                         f"{child.process.exitcode})")) for job in lost])
