"""Turning a scheduler job into an HTTP response: one JSON body, or server-sent events.

The handler waits for the job's first event before answering, so a request that fails in its
prefill (too long, ...) still gets a proper 4xx status rather than an error inside a 200
stream. While it waits, and while a non-streaming response is being generated, a watcher
listens for the client's disconnect and cancels the job; during a stream, Starlette cancels the
generator on disconnect and its ``finally`` cancels the job.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cacheblend.server.convert import ChunkMaker
from cacheblend.server.errors import as_api_error, error_body
from cacheblend.server.scheduler import Job, Scheduler

CLIENT_CLOSED = 499  # nginx's "client closed request": counted, never seen by the client


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class JobEvents:
    """A job's events, raced against the client's disconnect."""

    def __init__(self, scheduler: Scheduler, job: Job, request: Request) -> None:
        self.scheduler = scheduler
        self.job = job
        self._gone = asyncio.ensure_future(_disconnected(request))

    async def next(self) -> tuple[str, Any]:
        getter = asyncio.ensure_future(self.job.events.get())
        done, _ = await asyncio.wait({getter, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        self.scheduler.cancel(self.job)
        raise ClientGone

    def close(self) -> None:
        self._gone.cancel()


async def collect(scheduler: Scheduler, job: Job, request: Request) -> Any:
    """Wait for a job's final value; raise its error as an ApiError, ClientGone if the client
    left (the job is cancelled then)."""
    events = JobEvents(scheduler, job, request)
    try:
        while True:
            kind, value = await events.next()
            if kind == "done":
                return value
            if kind == "error":
                raise as_api_error(value)
    finally:
        events.close()
        scheduler.cancel(job)  # no-op unless it is still going


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def respond(
    scheduler: Scheduler,
    job: Job,
    request: Request,
    stream: bool,
    body: Callable[[Any, float], dict],
    chunks: ChunkMaker,
) -> Response:
    """The HTTP response for a generation job; ``body(result, queue_s)`` builds the JSON."""
    if not stream:
        try:
            result, queue_s = await collect(scheduler, job, request)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(body(result, queue_s))
    events = JobEvents(scheduler, job, request)
    try:
        first = await events.next()
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        events.close()
    if first[0] == "error":
        scheduler.cancel(job)
        raise as_api_error(first[1])
    return StreamingResponse(
        _stream(scheduler, job, first, chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(
    scheduler: Scheduler, job: Job, first: tuple[str, Any], chunks: ChunkMaker
) -> AsyncIterator[str]:
    try:
        for chunk in chunks.opening():
            yield _sse(chunk)
        kind, value = first
        while True:
            if kind == "delta":
                yield _sse(chunks.delta(value))
            elif kind == "done":
                for chunk in chunks.closing(*value):
                    yield _sse(chunk)
                break
            else:
                error = as_api_error(value)
                yield _sse(error_body(error.status, error.message, error.param, error.code))
                break
            kind, value = await job.events.get()
        yield "data: [DONE]\n\n"
    finally:
        scheduler.cancel(job)  # the client left mid-stream: free its work
