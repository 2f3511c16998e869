"""Graceful drain: what ``cacheblend serve`` does on SIGTERM / SIGINT.

1. Stop admitting: new requests get a JSON 503 with ``Retry-After``; ``/health`` says
   ``draining`` (503), so a load balancer routes elsewhere.
2. Requests already admitted (queued, prefilling, decoding) go on for up to ``drain_timeout``
   seconds.
3. Whatever is still going then gets a JSON error (a last SSE event on a stream, a 503 body
   otherwise), and the process exits with status 0.

A second signal exits at once.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from cacheblend.server.scheduler import Scheduler

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, drain_timeout: float) -> None:
        super().__init__(config)
        self.scheduler = scheduler
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig, frame) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the
        # process would die of it instead of exiting 0.
        if self.scheduler.draining:
            self.force_exit = self.should_exit = True
            return
        self.scheduler.drain()
        threading.Thread(target=self._drain, name="cacheblend-drain", daemon=True).start()

    def _drain(self) -> None:
        log.warning("draining: %d requests in flight, up to %.0f s",
                    self.scheduler.in_flight, self.drain_timeout)
        deadline = time.monotonic() + self.drain_timeout
        while self.scheduler.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.scheduler.in_flight:
            log.warning("drain timeout: cancelling %d requests", self.scheduler.in_flight)
        self.scheduler.stop()
        self.should_exit = True
