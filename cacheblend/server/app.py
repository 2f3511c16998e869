"""The FastAPI app: OpenAI-compatible endpoints over one Engine, behind one Scheduler.

    POST /v1/chat/completions   POST /v1/completions   (stream: server-sent events)
    GET  /v1/models             GET  /v1/models/{id}
    POST /v1/documents          GET  /v1/documents     GET | DELETE /v1/documents/{id}
    POST /tokenize              POST /detokenize       (vLLM's shapes)
    GET  /health (no key)       GET  /metrics (Prometheus)

The handlers only validate, translate (``convert``) and hand work to the scheduler; the
engine is the one place the model, store and fusor meet. Several choices (``n``, a batch of
completion prompts) are several scheduler jobs of one HTTP request.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cacheblend.engine import Engine
from cacheblend.server import convert
from cacheblend.server.convert import Outcome, TokenText
from cacheblend.server.documents import (
    DocumentRegistry,
    RegistryFullError,
    RegistryUnavailableError,
    StoredDocument,
    document_id,
    open_documents,
)
from cacheblend.server.errors import ApiError, as_api_error, install_error_handlers
from cacheblend.server.metrics import CONTENT_TYPE, ServerMetrics, served_method
from cacheblend.server.middleware import ApiKeyCheck, BodyLimit, JsonContentType, RequestCounter
from cacheblend.server.protocol import (
    DOCUMENT_ID_PATTERN,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    DocumentDeleted,
    DocumentDetail,
    DocumentList,
    DocumentRef,
    DocumentUpload,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from cacheblend.server.responses import ClientGone, collect, respond
from cacheblend.server.scheduler import Job, QueueFullError, Scheduler, SchedulerStopped
from cacheblend.server.settings import ServerSettings
from cacheblend.store.ops import held_everywhere, missing_tiers, store_problems

log = logging.getLogger(__name__)

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
ENDPOINTS = {
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/documents",
    "/tokenize",
    "/detokenize",
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
    model_names = list(dict.fromkeys([model_name, *settings.served_model_names,
                                      engine.loaded.name]))
    started = int(time.time())
    token_texts: list[TokenText] = []  # built on first use, in the worker thread
    for problem in store_problems(engine.store):
        log.warning("store degraded: %s; requests are still served (what misses is "
                    "recomputed) but nothing is saved there; /health says degraded", problem)

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
    app.add_middleware(JsonContentType)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyCheck, api_key=settings.api_key)
    app.add_middleware(
        RequestCounter, metrics=metrics, endpoints=ENDPOINTS, log_requests=settings.log_requests
    )

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

    def submit_all(prepares: list) -> list[Job]:
        jobs: list[Job] = []
        try:
            for prepare in prepares:
                jobs.append(submit(prepare))
        except ApiError:
            for job in jobs:
                scheduler.cancel(job)
            raise
        return jobs

    def check_model(name: str | None) -> None:
        if name is None or name in model_names:
            return
        if name.rsplit("/", 1)[-1] == engine.loaded.name:  # e.g. the Hugging Face id
            return
        raise ApiError(
            404,
            f"model {name!r} does not exist; this server serves {model_name!r} "
            f"(also accepted: {', '.join(repr(n) for n in model_names[1:]) or 'none'})",
            param="model",
            code="model_not_found",
        )

    async def registry_call(fn, *args):
        try:
            return await run_in_threadpool(fn, *args)
        except RegistryUnavailableError as exc:
            raise ApiError(503, str(exc), code="registry_unavailable") from exc

    async def texts_for(wanted: bool) -> TokenText | None:
        """The token-text table, when a response needs token strings (logprobs)."""
        if not wanted:
            return None
        if not token_texts:
            vocab = engine.runner.vocab_size
            table = await _wait(submit(lambda: TokenText(engine.tokenizer, vocab), True))
            token_texts[:] = [table]
        return token_texts[0]

    async def stored_document(document_id: str) -> StoredDocument:
        stored = await registry_call(registry.get, document_id)
        if stored is None:
            raise ApiError(
                404,
                f"document {document_id!r} not found",
                param="document_id",
                code="document_not_found",
            )
        return stored

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

    def log_outcomes(request: Request, outcomes: list[Outcome]) -> None:
        """What the request log line says about the generation (see middleware)."""
        first = outcomes[0].result.stats
        request.state.served = {
            "method": served_method(first.to_dict()),
            "prompt": sum({o.prompt_index: o.result.stats.prompt_tokens for o in outcomes}
                          .values()),
            "completion": sum(o.result.stats.completion_tokens for o in outcomes),
            "reused": sum({o.prompt_index: o.result.stats.reused_tokens for o in outcomes}
                          .values()),
            "ttft": f"{first.ttft_s + outcomes[0].queue_s:.3f}s",
            "choices": len(outcomes),
        }

    # --- OpenAI endpoints ---------------------------------------------------------------------

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        convert.refuse_unsupported(body.model_extra or {})
        prepares = convert.prepare_chat(engine, settings, body, await resolve(body.documents))
        if len(prepares) > settings.max_choices:
            raise ApiError(400, f"n is {body.n}; at most {settings.max_choices}", param="n",
                           code="invalid_value")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        texts = await texts_for(bool(body.logprobs))
        response_id = convert.new_id("chatcmpl")
        request.state.request_id = response_id
        return await respond(
            scheduler,
            submit_all(prepares),
            [0] * len(prepares),
            request,
            body.stream,
            lambda outcomes: convert.chat_response(outcomes, model_name, response_id, texts),
            convert.ChunkMaker(True, model_name, include_usage, response_id, texts),
            lambda outcomes: log_outcomes(request, outcomes),
        )

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        convert.refuse_unsupported(body.model_extra or {})
        jobs = convert.prepare_completion(engine, settings, body, await resolve(body.documents))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        texts = await texts_for(body.logprobs is not None)
        response_id = convert.new_id("cmpl")
        request.state.request_id = response_id
        return await respond(
            scheduler,
            submit_all([prepare for _, prepare in jobs]),
            [index for index, _ in jobs],
            request,
            body.stream,
            lambda outcomes: convert.completion_response(outcomes, model_name, response_id, texts),
            convert.ChunkMaker(False, model_name, include_usage, response_id, texts),
            lambda outcomes: log_outcomes(request, outcomes),
        )

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models() -> dict:
        cards = [ModelCard(id=name, created=started) for name in model_names]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return ModelCard(id=model_id, created=started)

    # --- tokenizer (vLLM's /tokenize and /detokenize) ------------------------------------------

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict:
        """The ids a request is served with: a completion's ``prompt`` or a chat's ``messages``
        (the chat template applied), so ``count`` is that request's ``prompt_tokens``."""
        check_model(body.model)
        prompts, tokenizer = engine.prompts, engine.tokenizer

        def run() -> list[int]:
            if body.messages is not None:
                messages = [
                    {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages
                ]
                if body.add_generation_prompt and any(m["role"] == "user" for m in messages):
                    return prompts.build_messages(messages, []).ids
                text = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=body.add_generation_prompt
                )
                return list(prompts.template_ids(text))
            if body.add_special_tokens:
                return tokenizer(body.prompt)["input_ids"]
            return list(prompts.template_ids(body.prompt or ""))

        tokens = await _wait(submit(run, True))
        return {"count": len(tokens), "max_model_len": engine.runner.max_positions,
                "tokens": tokens}

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        vocab = engine.runner.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ApiError(400, f"tokens must be ids in [0, {vocab})", param="tokens",
                           code="invalid_value")
        text = await _wait(submit(lambda: engine.tokenizer.decode(body.tokens), True))
        return {"prompt": text}

    # --- documents ----------------------------------------------------------------------------

    @app.post("/v1/documents", response_model=DocumentList, responses=ERRORS)
    async def upload_documents(body: DocumentUpload, request: Request) -> dict:
        """Precompute and store documents ahead of traffic; reference them later by id. A
        store that cannot keep them is a 503 naming why (the upload did not happen)."""
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
                f"most {engine.runner.max_positions - 1} with the context it is precomputed after",
                param=f"documents[{index}]",
                code="document_too_long",
            )
        # Bulk precompute runs in the engine's background lane, a layer at a time between
        # live steps: a chat sent during an upload waits for one slice at most.
        results = await _wait(submit_background(engine.ingest_slices([t for _, t in items])))
        problems = await _wait(submit(lambda: [_not_stored(engine, r) for r in results], True))
        data = []
        for index, ((doc_id, text), result, problem) in enumerate(zip(items, results, problems)):
            if problem:
                raise ApiError(
                    503,
                    f"documents[{index}] could not be stored: {problem}",
                    param=f"documents[{index}]",
                    code="store_unavailable",
                )
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

    @app.get("/v1/documents", response_model=DocumentList, responses=ERRORS)
    async def list_documents() -> dict:
        """Every uploaded document: id and token count (``cached``: its KV is in the store)."""
        ids = await registry_call(registry.ids)
        found = [(i, d) for i in ids if (d := await registry_call(registry.get, i)) is not None]
        keys = await _wait(submit(lambda: [engine.document_key(d.text) for _, d in found], True))
        cached = await run_in_threadpool(held_everywhere, engine.store, keys)
        data = [
            {"id": doc_id, "object": "document", "num_tokens": d.num_tokens, "cached": c}
            for (doc_id, d), c in zip(found, cached)
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/documents/{document_id}", response_model=DocumentDetail, responses=ERRORS)
    async def get_document(document_id: str = Path(pattern=DOCUMENT_ID_PATTERN)) -> dict:
        stored = await stored_document(document_id)
        key = await _wait(submit(lambda: engine.document_key(stored.text), True))
        (cached,) = await run_in_threadpool(held_everywhere, engine.store, [key])
        return {"id": document_id, "object": "document", "num_tokens": stored.num_tokens,
                "cached": cached, "text": stored.text}

    @app.delete("/v1/documents/{document_id}", response_model=DocumentDeleted, responses=ERRORS)
    async def delete_document(document_id: str = Path(pattern=DOCUMENT_ID_PATTERN)) -> dict:
        """Forget a document and drop its KV entries, its own and the one a request could
        borrow (a later use recomputes it)."""
        stored = await stored_document(document_id)
        problem = await _wait(submit(lambda: _delete_checked(engine, stored.text), True))
        if problem:
            raise ApiError(503, f"document {document_id!r} was not deleted: {problem}",
                           param="document_id", code="store_unavailable")
        await registry_call(registry.delete, document_id)
        return {"id": document_id, "object": "document", "deleted": True}

    # --- operations ---------------------------------------------------------------------------

    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        """``ok``, or ``degraded`` with ``problems`` (a store tier that cannot be reached or
        written: requests are still answered, but what misses is recomputed every time)."""
        if scheduler.draining:
            return JSONResponse(
                {"status": "draining", "model": model_name,
                 "queue_length": scheduler.queue_length, "running": scheduler.running},
                status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        if not scheduler.healthy:
            raise ApiError(503, "the scheduler thread has stopped", code="unhealthy")
        problems = await run_in_threadpool(store_problems, engine.store)
        return JSONResponse(
            {
                "status": "degraded" if problems else "ok",
                "model": model_name,
                "queue_length": scheduler.queue_length,
                "running": scheduler.running,
                "problems": problems,
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


def _not_stored(engine: Engine, result) -> str | None:
    """Why the store did not keep an ingested document (None: every tier holds it)."""
    missing = missing_tiers(engine.store, result.key)
    if not missing:
        return None
    reasons = store_problems(engine.store) or [f"the {', '.join(missing)} tier did not keep it"]
    return "; ".join(reasons)


def _delete_checked(engine: Engine, text: str) -> str | None:
    """Drop a document's KV entries (``Engine.document_keys``) from every tier; why not, if a
    tier cannot be reached."""
    problems = store_problems(engine.store, write=False)
    if problems:
        return "; ".join(problems)
    for key in engine.document_keys(text):
        engine.store.delete(key)
    return None

