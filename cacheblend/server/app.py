"""The FastAPI app: OpenAI-compatible endpoints over one Engine, behind one Scheduler.

    POST /v1/chat/completions   POST /v1/completions   (stream: server-sent events)
    GET  /v1/models             GET  /v1/models/{id}
    POST /v1/documents          DELETE /v1/documents/{id}
    GET  /health (no key)       GET  /metrics (Prometheus)

The handlers only validate, translate (``convert``) and hand work to the scheduler; the
engine is the one place the model, store and fusor meet.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cacheblend.engine import Engine
from cacheblend.server import convert
from cacheblend.server.documents import (
    DocumentRegistry,
    RegistryFullError,
    RegistryUnavailableError,
    StoredDocument,
    document_id,
    open_documents,
)
from cacheblend.server.errors import ApiError, as_api_error, install_error_handlers
from cacheblend.server.metrics import CONTENT_TYPE, ServerMetrics
from cacheblend.server.middleware import ApiKeyCheck, BodyLimit, RequestCounter
from cacheblend.server.protocol import (
    DOCUMENT_ID_PATTERN,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DocumentDeleted,
    DocumentList,
    DocumentRef,
    DocumentUpload,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from cacheblend.server.responses import ClientGone, collect, respond
from cacheblend.server.scheduler import Job, QueueFullError, Scheduler, SchedulerStopped
from cacheblend.server.settings import ServerSettings

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
ENDPOINTS = {
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/documents",
    "/openapi.json",
    "/docs",
}


def create_app(
    engine: Engine,
    settings: ServerSettings | None = None,
    documents: DocumentRegistry | None = None,
) -> FastAPI:
    """An app serving ``engine``; its worker thread starts with the first request (or the
    lifespan) and stops with the lifespan."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(engine.store)
    scheduler = Scheduler(engine, settings.max_batch_size, settings.max_queue, metrics)
    registry = documents or open_documents(engine.store, settings.max_stored_documents)
    model_name = settings.served_model_name or engine.loaded.name
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(
        title="cacheblend",
        summary="OpenAI-compatible server with CacheBlend KV reuse",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.engine, app.state.scheduler = engine, scheduler
    app.state.metrics, app.state.documents, app.state.settings = metrics, registry, settings
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyCheck, api_key=settings.api_key)
    app.add_middleware(RequestCounter, metrics=metrics, endpoints=ENDPOINTS)

    def submit(fn, call: bool = False) -> Job:
        return admit(scheduler.submit_call if call else scheduler.submit, fn)

    def submit_background(slices) -> Job:
        return admit(scheduler.submit_background, slices)

    def admit(submit_to, work) -> Job:
        try:
            return submit_to(work)
        except QueueFullError as exc:
            raise ApiError(
                429,
                f"server busy: {exc}; retry later",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from exc
        except SchedulerStopped as exc:
            raise ApiError(503, str(exc), code="shutting_down",
                           headers={"Retry-After": str(settings.retry_after_s)}) from exc

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def registry_call(fn, *args):
        try:
            return await run_in_threadpool(fn, *args)
        except RegistryUnavailableError as exc:
            raise ApiError(503, str(exc), code="registry_unavailable") from exc

    async def resolve(items: list | None) -> list[str]:
        """Request documents -> texts (uploaded ones looked up by id)."""
        items = items or []
        if len(items) > settings.max_documents_per_request:
            raise ApiError(
                413,
                f"{len(items)} documents; at most {settings.max_documents_per_request} per request",
                param="documents",
                code="too_many_documents",
            )
        texts = []
        for index, item in enumerate(items):
            text = item if isinstance(item, str) else item.text
            if text is None:
                assert isinstance(item, DocumentRef) and item.id is not None
                stored = await registry_call(registry.get, item.id)
                if stored is None:
                    raise ApiError(
                        404,
                        f"document {item.id!r} not found; upload it with POST /v1/documents",
                        param=f"documents[{index}].id",
                        code="document_not_found",
                    )
                text = stored.text
            check_document(text, f"documents[{index}]")
            texts.append(text)
        return texts

    def check_document(text: str, param: str) -> None:
        if not text.strip():
            raise ApiError(400, f"{param} is empty", param=param, code="invalid_value")
        if len(text) > settings.max_document_chars:
            raise ApiError(
                413,
                f"{param} has {len(text)} characters; at most {settings.max_document_chars}",
                param=param,
                code="document_too_large",
            )

    # --- OpenAI endpoints ---------------------------------------------------------------------

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported")
        prepare = convert.prepare_chat(engine, settings, body, await resolve(body.documents))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond(
            scheduler,
            submit(prepare),
            request,
            body.stream,
            lambda result, queue_s: convert.chat_response(result, queue_s, model_name),
            convert.ChunkMaker(True, model_name, include_usage),
        )

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo", code="unsupported")
        prepare = convert.prepare_completion(engine, settings, body, await resolve(body.documents))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await respond(
            scheduler,
            submit(prepare),
            request,
            body.stream,
            lambda result, queue_s: convert.completion_response(result, queue_s, model_name),
            convert.ChunkMaker(False, model_name, include_usage),
        )

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models() -> dict:
        return {"object": "list", "data": [ModelCard(id=model_name, created=started)]}

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return ModelCard(id=model_name, created=started)

    # --- documents ----------------------------------------------------------------------------

    @app.post("/v1/documents", response_model=DocumentList, responses=ERRORS)
    async def upload_documents(body: DocumentUpload, request: Request) -> dict:
        """Precompute and store documents ahead of traffic; reference them later by id."""
        if len(body.documents) > settings.max_documents_per_request:
            raise ApiError(
                413,
                f"{len(body.documents)} documents; at most "
                f"{settings.max_documents_per_request} per request",
                param="documents",
                code="too_many_documents",
            )
        items = []
        for index, item in enumerate(body.documents):
            text = item if isinstance(item, str) else item.text
            check_document(text, f"documents[{index}]")
            doc_id = item.id if not isinstance(item, str) and item.id else document_id(text)
            items.append((doc_id, text))
        try:
            too_long = await collect(
                scheduler, submit(lambda: _too_long(engine, items), True), request
            )
        except ClientGone:
            return Response(status_code=499)
        if too_long:
            index, tokens = too_long
            raise ApiError(
                400,
                f"documents[{index}] has {tokens} tokens; the model allows at "
                f"most {engine.runner.max_positions - 1} with its preamble",
                param=f"documents[{index}]",
                code="document_too_long",
            )
        # Bulk precompute runs in the engine's background lane, one document per step between
        # live steps: a chat sent during an upload waits for one document at most.
        job = submit_background(engine.ingest_slices([text for _, text in items]))
        results = await _wait(job)
        data = []
        for (doc_id, text), result in zip(items, results):
            try:
                await registry_call(
                    registry.put, doc_id, StoredDocument(text=text, num_tokens=result.num_tokens)
                )
            except RegistryFullError as exc:
                raise ApiError(400, str(exc), param="documents", code="registry_full") from exc
            data.append(
                {
                    "id": doc_id,
                    "object": "document",
                    "num_tokens": result.num_tokens,
                    "cached": result.cached,
                }
            )
        return {"object": "list", "data": data}

    @app.delete("/v1/documents/{document_id}", response_model=DocumentDeleted, responses=ERRORS)
    async def delete_document(document_id: str = Path(pattern=DOCUMENT_ID_PATTERN)) -> dict:
        """Forget a document and drop its KV entry (a later use recomputes it)."""
        stored = await registry_call(registry.get, document_id)
        if stored is None:
            raise ApiError(
                404,
                f"document {document_id!r} not found",
                param="document_id",
                code="document_not_found",
            )
        await registry_call(registry.delete, document_id)
        await _wait(submit(lambda: engine.store.delete(engine.document_key(stored.text)), True))
        return {"id": document_id, "object": "document", "deleted": True}

    # --- operations ---------------------------------------------------------------------------

    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if scheduler.draining:
            return JSONResponse(
                {"status": "draining", "model": model_name,
                 "queue_length": scheduler.queue_length, "running": scheduler.running},
                status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        if not scheduler.healthy:
            raise ApiError(503, "the scheduler thread has stopped", code="unhealthy")
        return JSONResponse(
            {
                "status": "ok",
                "model": model_name,
                "queue_length": scheduler.queue_length,
                "running": scheduler.running,
            }
        )

    @app.get("/metrics", response_class=Response, responses=ERRORS)
    async def prometheus_metrics() -> Response:
        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE)

    return app


async def _wait(job: Job):
    """A call job's value (not cancelled if the client leaves: stored work is worth keeping)."""
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise as_api_error(value)


def _too_long(engine: Engine, items: list[tuple[str, str]]) -> tuple[int, int] | None:
    """(index, tokens) of the first document too long to precompute, else None."""
    for index, (_, text) in enumerate(items):
        tokens, with_preamble = engine.document_tokens(text)
        if with_preamble >= engine.runner.max_positions:
            return index, tokens
    return None
