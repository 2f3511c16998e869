"""Plain ASGI middleware, outermost first: count requests by status, check the API key, cap the
body size. The key is checked before a byte of the body is read."""

from __future__ import annotations

import hmac
import json

from cacheblend.server.errors import error_body
from cacheblend.server.metrics import ServerMetrics

OPEN_PATHS = ("/health",)


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
    """Counts every HTTP response by endpoint and status (499: the client left first)."""

    def __init__(self, app, metrics: ServerMetrics, endpoints: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
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
