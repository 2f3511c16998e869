"""Turning scheduler jobs (one per choice) into an HTTP response: one JSON body, or server-sent
events.

The handler waits for every job's first event before answering, so a request that fails in its
prefill (too long, ...) still gets a proper 4xx status rather than an error inside a 200
stream. While it waits, and while a non-streaming response is being generated, a watcher
listens for the client's disconnect and cancels the jobs; during a stream, Starlette cancels the
generator on disconnect and its ``finally`` cancels the jobs. Several choices (``n``, batched
prompts) stream interleaved, each chunk naming its choice's index.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cacheblend.server.convert import ChunkMaker, Outcome
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
    """Jobs' events, raced against the client's disconnect (which cancels every job)."""

    def __init__(self, scheduler: Scheduler, jobs: list[Job], request: Request) -> None:
        self.scheduler = scheduler
        self.jobs = jobs
        self._gone = asyncio.ensure_future(_disconnected(request))

    async def next(self, job: Job) -> tuple[str, Any]:
        getter = asyncio.ensure_future(job.events.get())
        done, _ = await asyncio.wait({getter, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        cancel(self.scheduler, self.jobs)
        raise ClientGone

    def close(self) -> None:
        self._gone.cancel()


def cancel(scheduler: Scheduler, jobs: list[Job]) -> None:
    for job in jobs:
        scheduler.cancel(job)  # no-op unless it is still going


async def collect(scheduler: Scheduler, job: Job, request: Request) -> Any:
    """Wait for a job's final value; raise its error as an ApiError, ClientGone if the client
    left (the job is cancelled then)."""
    return (await collect_all(scheduler, [job], request))[0]


async def collect_all(scheduler: Scheduler, jobs: list[Job], request: Request) -> list[Any]:
    """Every job's final value, in order; the first error fails them all."""
    events = JobEvents(scheduler, jobs, request)
    values = []
    try:
        for job in jobs:
            while True:
                kind, value = await events.next(job)
                if kind == "done":
                    values.append(value)
                    break
                if kind == "error":
                    raise as_api_error(value)
        return values
    finally:
        events.close()
        cancel(scheduler, jobs)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def respond(
    scheduler: Scheduler,
    jobs: list[Job],
    prompt_indices: list[int],
    request: Request,
    stream: bool,
    body: Callable[[list[Outcome]], dict],
    chunks: ChunkMaker,
    on_done: Callable[[list[Outcome]], None] = lambda outcomes: None,
) -> Response:
    """The HTTP response for generation jobs (one per choice); ``body(outcomes)`` builds the
    JSON; ``on_done`` sees the outcomes once every choice has finished."""
    if not stream:
        try:
            values = await collect_all(scheduler, jobs, request)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        outcomes = [Outcome(r, q, p) for (r, q), p in zip(values, prompt_indices)]
        on_done(outcomes)
        return JSONResponse(body(outcomes))
    events = JobEvents(scheduler, jobs, request)
    try:
        firsts = [await events.next(job) for job in jobs]
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        events.close()
    for kind, value in firsts:
        if kind == "error":
            cancel(scheduler, jobs)
            raise as_api_error(value)
    return StreamingResponse(
        _stream(scheduler, jobs, prompt_indices, firsts, chunks, on_done),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(
    scheduler: Scheduler,
    jobs: list[Job],
    prompt_indices: list[int],
    firsts: list[tuple[str, Any]],
    chunks: ChunkMaker,
    on_done: Callable[[list[Outcome]], None],
) -> AsyncIterator[str]:
    merged: asyncio.Queue = asyncio.Queue()
    for index, first in enumerate(firsts):
        merged.put_nowait((index, *first))

    async def pump(index: int, job: Job) -> None:
        while True:
            kind, value = await job.events.get()
            merged.put_nowait((index, kind, value))
            if kind != "delta":
                return

    pumps = [
        asyncio.ensure_future(pump(i, job))
        for i, (job, (kind, _)) in enumerate(zip(jobs, firsts))
        if kind == "delta"
    ]
    outcomes: dict[int, Outcome] = {}
    try:
        for chunk in chunks.opening(len(jobs)):
            yield _sse(chunk)
        while len(outcomes) < len(jobs):
            index, kind, value = await merged.get()
            if kind == "delta":
                text, logprobs = value
                yield _sse(chunks.delta(index, text, logprobs))
            elif kind == "done":
                outcomes[index] = Outcome(*value, prompt_indices[index])
                yield _sse(chunks.closing(index, outcomes[index]))
            else:
                error = as_api_error(value)
                yield _sse(error_body(error.status, error.message, error.param, error.code))
                break
        else:
            ordered = [outcomes[i] for i in range(len(jobs))]
            for chunk in chunks.final(ordered):
                yield _sse(chunk)
            on_done(ordered)
        yield "data: [DONE]\n\n"
    finally:
        for task in pumps:
            task.cancel()
        cancel(scheduler, jobs)  # the client left mid-stream: free their work
