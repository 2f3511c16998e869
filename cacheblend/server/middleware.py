"""Plain ASGI middleware, outermost first: count and log requests by status, check the API key,
cap the body size, read any POST body as JSON. The key is checked before a byte of the body is
read."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from cacheblend.server.errors import error_body
from cacheblend.server.metrics import ServerMetrics

OPEN_PATHS = ("/health",)
QUIET_PATHS = ("/health", "/metrics")  # polled: not logged per request
request_log = logging.getLogger("cacheblend.server.requests")


async def _send_error(
    send, status: int, message: str, code: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestCounter:
    """Counts every HTTP response by endpoint and status (499: the client left first), and
    logs one line per request: id, method and path, status, time and, for a generation, the
    method served, tokens, reused tokens and TTFT (the handler leaves them in
    ``request.state.served``). The id is the response's id when it has one, and goes back in
    the ``X-Request-Id`` header."""

    def __init__(
        self, app, metrics: ServerMetrics, endpoints: set[str], log_requests: bool = True
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints
        self.log_requests = log_requests

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499
        state = scope.setdefault("state", {})
        state.setdefault("request_id", f"req-{uuid.uuid4().hex[:24]}")
        start = time.perf_counter()

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []),
                           (b"x-request-id", state["request_id"].encode())]
                message = {**message, "headers": headers}
            await send(message)

        path = scope.get("path", "")
        endpoint = (
            path
            if path in self.endpoints
            else ("/v1/documents/{id}" if path.startswith("/v1/documents/") else "other")
        )
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            if self.log_requests and path not in QUIET_PATHS:
                served = state.get("served") or {}
                fields = "".join(f" {k}={v}" for k, v in served.items())
                request_log.info(
                    "%s %s %s %d%s time=%.3fs",
                    state["request_id"],
                    scope.get("method", ""),
                    path,
                    status,
                    fields,
                    time.perf_counter() - start,
                )


class ApiKeyCheck:
    """Requires ``Authorization: Bearer <key>`` on every path but /health."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            message = "invalid API key" if given else "missing API key: send Authorization: Bearer"
            await _send_error(
                send, 401, message, "invalid_api_key", ((b"www-authenticate", b"Bearer"),)
            )
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a body over ``max_bytes`` with 413, whether it declares its length or not.

    The body is read here, within the limit, and handed to the app whole; after it, ``receive``
    passes through, so the app still hears a client disconnect.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.max_bytes
        except ValueError:
            await _send_error(send, 400, "invalid Content-Length header", "invalid_header")
            return
        if too_big:
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        await _send_error(
            send, 413, f"request body exceeds {self.max_bytes} bytes", "body_too_large"
        )


JSON_TYPES = (b"application/json",)


class JsonContentType:
    """Reads every request body as JSON, whatever its content type: ``curl -d '{...}'`` sends
    ``application/x-www-form-urlencoded``, and refusing a JSON body for its label helps nobody.
    The type that was sent is kept (``state["sent_content_type"]``) so a body that is not JSON
    gets a 400 that says what to send instead."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        sent = dict(scope["headers"]).get(b"content-type", b"")
        media = sent.split(b";")[0].strip().lower()
        if media in JSON_TYPES or media.endswith(b"+json"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["sent_content_type"] = sent.decode("latin-1") or "no content type"
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
