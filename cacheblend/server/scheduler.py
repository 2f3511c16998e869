"""The request queue in front of the one model.

One worker thread owns the model. Each turn it starts at most one waiting job (a generation's
prefill and first token, or a call such as an ingest), then runs one decode step for every
running generation together (``decode_batch``: the weights are read once per step for all of
them). ``max_batch_size=1`` runs requests strictly one after another.

Jobs talk to the asyncio side through an ``asyncio.Queue`` per job: ``("delta", (text,
logprobs))`` (the ``TokenLogprob`` entries since the previous delta, None unless asked),
then ``("done", GenerateResult | value)`` or ``("error", exception)``. Cancelling a job (its
client left) drops it from the queue, or from the running batch at the next step, which frees
its KV cache. Each running request has its own ``RequestKV``, ``Sampler`` (its own RNG) and
``StopChecker``: nothing is shared between requests but the weights.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cacheblend.decode import Sampler, StopChecker
from cacheblend.engine import Engine, GenerateRequest, GenerateResult, RequestStats
from cacheblend.kv import RequestKV
from cacheblend.server.batching import decode_batch
from cacheblend.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """More requests are waiting than the scheduler accepts."""


class SchedulerStopped(Exception):
    """The server is shutting down."""


@dataclass(eq=False)
class Job:
    """One unit of work and the channel back to the request handler.

    ``prepare`` runs in the worker (it tokenizes: the tokenizer is only ever used from that
    thread) and returns the GenerateRequest; ``call`` jobs run ``fn`` and send its value.
    """

    loop: asyncio.AbstractEventLoop
    prepare: Callable[[], GenerateRequest] | None = None
    fn: Callable[[], Any] | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    finished: bool = False
    # generation state, owned by the worker thread
    kv: RequestKV | None = None
    sampler: Sampler | None = None
    stopper: StopChecker | None = None
    stats: RequestStats | None = None
    next_token: int = 0
    logprobs_sent: int = 0  # sampler.logprobs entries already sent with a delta
    started: float = 0.0
    first_token: float = 0.0

    def send(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    def release(self) -> None:
        self.kv = self.sampler = self.stopper = None


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
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.watch_queue(lambda: self.queue_length, lambda: self.running)

    # --- the asyncio side ---------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def healthy(self) -> bool:
        """False once the worker thread has died (or been stopped)."""
        return self._thread is None or (self._thread.is_alive() and not self._stopping)

    def submit(self, prepare: Callable[[], GenerateRequest]) -> Job:
        return self._enqueue(Job(asyncio.get_running_loop(), prepare=prepare))

    def submit_call(self, fn: Callable[[], Any]) -> Job:
        return self._enqueue(Job(asyncio.get_running_loop(), fn=fn))

    def _enqueue(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are waiting already")
            self._pending.append(job)
            self._cond.notify()
        self.start()
        return job

    def cancel(self, job: Job) -> None:
        """The client left: drop the job wherever it is (idempotent)."""
        if job.finished or job.cancelled:
            return
        with self._cond:
            job.cancelled = True
            try:
                self._pending.remove(job)
            except ValueError:
                pass  # running: the worker drops it before the next step
        if self.metrics is not None:
            self.metrics.cancelled.inc()

    def start(self) -> None:
        """Start the worker (idempotent; the first submit starts it too)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="cacheblend-scheduler", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for job in [*self._pending, *self._running]:
            job.send("error", SchedulerStopped("the server is shutting down"))
            job.release()
        self._pending.clear()
        self._running.clear()

    # --- the worker thread --------------------------------------------------------------------

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._running:
                    self._cond.wait()
                if self._stopping:
                    return
                job = None
                if self._pending and len(self._running) < self.max_batch_size:
                    job = self._pending.popleft()
            try:
                if job is not None:
                    self._start(job)
                self._running = [j for j in self._running if not self._dropped(j)]
                if self._running:
                    self._step()
            except Exception as exc:  # a bug fails these requests, not the server
                log.exception("scheduler turn failed")
                self._fail([job] if job is not None else [], exc)
                self._fail(self._running, exc)
                self._running = []

    @staticmethod
    def _fail(jobs: list[Job], exc: Exception) -> None:
        for job in jobs:
            if not job.finished:
                job.finished = True
                job.release()
                job.send("error", exc)

    def _dropped(self, job: Job) -> bool:
        if job.cancelled:
            job.release()
        return job.cancelled

    def _start(self, job: Job) -> None:
        if job.cancelled:
            return
        job.started = time.perf_counter()
        try:
            if job.fn is not None:
                with self.engine.lock:
                    value = job.fn()
                job.finished = True
                job.send("done", value)
                return
            request = job.prepare()
            job.kv, logits, job.stats, store_writes = self.engine.prefill_then_store(request)
            prompt_ids = (self.engine.segments_for(request).ids
                          if request.sampling.uses_prompt else None)
            job.sampler = Sampler(
                request.sampling, self.engine.config.device, self.engine.eos_ids, prompt_ids
            )
            job.stopper = StopChecker(self.engine.tokenizer, request.sampling, self.engine.eos_ids)
            token = job.sampler(logits)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to its request
            self._fail([job], exc)
            return
        job.first_token = time.perf_counter()
        job.stats.ttft_s = job.first_token - job.started
        going_on = self._advance(job, token)  # the first token goes out before the writes
        store_writes()
        if going_on:
            self._running.append(job)

    def _advance(self, job: Job, token: int) -> bool:
        """Record a sampled token; True while the job goes on."""
        delta = job.stopper.add(token)
        if delta:
            logprobs = job.sampler.logprobs
            new = None if logprobs is None else logprobs[job.logprobs_sent :]
            job.logprobs_sent = 0 if logprobs is None else len(logprobs)
            job.send("delta", (delta, new))
        if job.stopper.done or job.kv.length >= job.kv.capacity:
            self._finish(job)
            return False
        job.next_token = token
        return True

    def _step(self) -> None:
        batch = self._running
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        try:
            with self.engine.lock:
                logits = decode_batch(
                    self.engine.runner, [j.kv for j in batch], [j.next_token for j in batch]
                )  # (B, V)
                tokens = [job.sampler(logits[row]) for row, job in enumerate(batch)]
        except Exception as exc:
            log.exception("decode step failed for %d requests", len(batch))
            self._fail(batch, exc)
            self._running = []
            return
        self._running = [job for job, token in zip(batch, tokens) if self._advance(job, token)]

    def _finish(self, job: Job) -> None:
        now = time.perf_counter()
        stopper, stats = job.stopper, job.stats
        stats.decode_s = now - job.first_token
        stats.completion_tokens = len(stopper.tokens)
        result = GenerateResult(
            stopper.text,
            stopper.tokens,
            stopper.finish_reason or "length",
            stats,
            logprobs=job.sampler.logprobs,
        )
        queue_s = job.started - job.created
        if self.metrics is not None:
            self.metrics.observe_request(
                stats.to_dict(), queue_s, job.first_token - job.created, now - job.created
            )
        job.finished = True
        job.release()
        job.send("done", (result, queue_s))
