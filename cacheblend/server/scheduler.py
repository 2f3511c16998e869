"""The server's side of the engine's lifecycle: one worker thread and the asyncio bridge.

The worker thread owns the model: it calls ``Engine.step()`` while the engine has work and
sleeps on the engine's condition otherwise. Everything about a request's life (admission,
chunked prefill, batched decode, stopping, store writes after the first token, the background
lane for uploads) is the engine's; this module only carries events back to the event loop.

Each job gets an ``asyncio.Queue``: ``("delta", (text, logprobs))``, then ``("done", (GenerateResult,
queue_s))`` or ``("done", value)`` for a call, or ``("error", exception)``. Cancelling a job (its
client left) aborts its sequence; the engine drops it, and frees its KV, at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from cacheblend.engine import Engine, GenerateRequest
from cacheblend.sequence import Sequence, Task
from cacheblend.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """More requests are waiting than the scheduler accepts."""


class SchedulerStopped(Exception):
    """The server is shutting down (or draining) and admits no new work."""


@dataclass(eq=False)
class Job:
    """One request's channel back to its handler, and its place in the engine."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.perf_counter)
    item: Sequence | Task | None = None
    finished: bool = False
    cancelled: bool = False

    def send(self, kind: str, value: Any) -> None:
        if kind in ("done", "error"):
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 8,
        max_queue: int = 256,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self._jobs: set[Job] = set()  # not finished yet
        self._stopping = False
        self.draining = False
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.watch_queue(lambda: self.queue_length, lambda: self.running)

    # --- the asyncio side ---------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return self.engine.num_waiting

    @property
    def running(self) -> int:
        return self.engine.num_running

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    @property
    def healthy(self) -> bool:
        """False once the worker thread has died (or been stopped)."""
        return self._thread is None or (self._thread.is_alive() and not self._stopping)

    def submit(self, prepare: Callable[[], GenerateRequest]) -> Job:
        """A generation; ``prepare`` (it tokenizes) runs on the worker thread, in a call."""
        job = self._job()

        def add() -> None:
            request = prepare()
            if not job.cancelled:
                job.item = self.engine.add_request(request, emit=self._emit(job, True))

        def failed(kind: str, value: Any) -> None:
            if kind == "error":
                self._emit(job, True)(kind, value)

        job.item = self.engine.submit(add, emit=failed)
        return job

    def submit_call(self, fn: Callable[[], Any]) -> Job:
        """A quick call (a lookup, a delete) that needs the worker thread."""
        job = self._job()
        job.item = self.engine.submit(fn, emit=self._emit(job, False))
        return job

    def submit_background(self, slices: Generator[None, None, Any]) -> Job:
        """Bulk work (an upload's precompute), one slice per step while no live request waits."""
        job = self._job()
        job.item = self.engine.submit(slices=slices, background=True,
                                      emit=self._emit(job, False))
        return job

    def _job(self) -> Job:
        if self._stopping or self.draining:
            raise SchedulerStopped("the server is shutting down; retry on another replica")
        if self.engine.num_waiting >= self.max_queue:
            raise QueueFullError(f"{self.engine.num_waiting} requests are waiting already")
        job = Job(asyncio.get_running_loop())
        self._jobs.add(job)
        self.start()
        return job

    def _emit(self, job: Job, generation: bool):
        def emit(kind: str, value: Any) -> None:
            if kind == "done" and generation:
                # Queued from the handler's submit (prompt building included) to the prefill.
                value.stats.queue_s = max(0.0, job.item.started - job.created)
                self._observe(job, value)
                value = (value, value.stats.queue_s)
            if kind in ("done", "error"):
                self._jobs.discard(job)
            job.send(kind, value)
        return emit

    def _observe(self, job: Job, result) -> None:
        if self.metrics is None:
            return
        stats = result.stats
        now = time.perf_counter()
        first_token = job.created + stats.queue_s + stats.ttft_s
        self.metrics.observe_request(stats.to_dict(), stats.queue_s, first_token - job.created,
                                     now - job.created)

    def cancel(self, job: Job) -> None:
        """The client left: abort its work wherever it is (idempotent)."""
        if job.finished or job.cancelled:
            return
        job.cancelled = True
        self._jobs.discard(job)
        if job.item is not None:
            self.engine.abort(job.item)
        if self.metrics is not None:
            self.metrics.cancelled.inc()
        self._wake()

    def start(self) -> None:
        """Start the worker (idempotent; the first submit starts it too)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="cacheblend-scheduler", daemon=True
            )
            self._thread.start()

    def drain(self) -> None:
        """Admit nothing new; work already admitted goes on."""
        self.draining = True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; every job still going gets a JSON error."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        for job in list(self._jobs):
            if job.item is not None:
                self.engine.abort(job.item)
            job.send("error", SchedulerStopped("the server shut down before this request finished"))
        self._jobs.clear()

    def _wake(self) -> None:
        with self.engine.work_added:
            self.engine.work_added.notify_all()

    # --- the worker thread --------------------------------------------------------------------

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        engine = self.engine
        while True:
            with engine.work_added:
                while not self._stopping and not engine.has_work():
                    engine.work_added.wait()
            if self._stopping:
                return
            try:
                report = engine.step(self.max_batch_size)
            except Exception:  # a bug must not kill the worker: the engine fails the requests
                log.exception("engine step failed")
                continue
            if report.decoded and self.metrics is not None:
                self.metrics.batch_size.observe(report.decoded)
