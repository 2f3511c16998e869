"""Every failure becomes an OpenAI-style error body: ``{"error": {message, type, param, code}}``.

User errors (bad JSON, wrong types, unknown model or document, too long, ...) are 4xx naming the
problem; only a bug is a 500, and then the body is still well-formed and the server keeps going.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cacheblend.errors import CacheBlendError
from cacheblend.server.scheduler import SchedulerStopped

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error with its HTTP status and OpenAI fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    error_type = ERROR_TYPES.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, param, code), status_code=status, headers=headers
    )


def as_api_error(exc: BaseException) -> ApiError:
    """Map an exception from the engine or scheduler to the error a client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, CacheBlendError):
        return ApiError(400, str(exc), code="invalid_request")
    if isinstance(exc, SchedulerStopped):
        return ApiError(503, str(exc), code="shutting_down", headers={"Retry-After": "5"})
    log.error("internal error", exc_info=(type(exc), exc, exc.__traceback__))
    return ApiError(500, "internal server error", code="internal_error")


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str | None:
    """("body", "documents", 0, "DocumentRef", "id") -> "documents[0].id" (union member tags
    such as "DocumentRef" or "list[str]" are dropped)."""
    text = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _FIELD.fullmatch(str(part)) and part not in _UNION_TAGS:
            text += f".{part}" if text else str(part)
    return text or None


def _most_specific(errors: list[dict]) -> dict:
    """The error that says most: a value error over a union branch's type mismatch, then the
    deepest location."""
    return max(
        errors, key=lambda e: (not str(e.get("type", "")).endswith("_type"), len(e.get("loc", ())))
    )


_TYPE_NAMES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a JSON object",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
}


def _explain(error: dict, param: str | None) -> str:
    """A pydantic error as a sentence naming the field, what it must be, and what came."""
    kind = str(error.get("type", ""))
    ctx = error.get("ctx") or {}
    field = param or "the request body"
    given = error.get("input")
    got = "" if isinstance(given, dict | list) or given is None else f", got {given!r}"
    if kind == "missing":
        return f"{field} is required"
    if kind == "extra_forbidden":
        return f"{field} is not a known field here; remove it (check its spelling)"
    if kind in _TYPE_NAMES:
        sent = type(given).__name__ if given is not None else "null"
        sent = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
                "list": "a list", "dict": "an object", "NoneType": "null"}.get(sent, sent)
        return f"{field} must be {_TYPE_NAMES[kind]}, not {sent}{got}"
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"{field} must be {bounds[kind]} {limit}{got}"
    if kind == "literal_error":
        return f"{field} must be one of {ctx.get('expected', '?')}{got}"
    if kind == "too_short":
        return f"{field} must have at least {ctx.get('min_length', 1)} item(s)"
    if kind == "too_long":
        return f"{field} may have at most {ctx.get('max_length', '?')} item(s)"
    if kind == "string_too_short":
        return f"{field} must not be empty"
    if kind == "string_pattern_mismatch":
        return f"{field} must match the pattern {ctx.get('pattern', '')}{got}"
    if kind == "value_error":
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        return f"{field}: {message}" if param else message
    return f"{field}: {error.get('msg')}" if param else str(error.get("msg"))


def _validation_error(exc: RequestValidationError, sent_type: str | None = None) -> ApiError:
    errors = list(exc.errors())
    if not errors:
        return ApiError(400, "invalid request", code="invalid_request")
    first = _most_specific(errors)
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        message = f"the request body is not valid JSON: {detail}".rstrip(": ")
        if sent_type:
            message += (
                f" (it was sent as {sent_type}; the body must be JSON: with curl, "
                "-H 'Content-Type: application/json' -d '{...}')"
            )
        return ApiError(400, message, code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param is None:
        return ApiError(400, "the request needs a JSON body", code="missing_body")
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return ApiError(400, "the request body must be a JSON object", code="invalid_body")
    # Union branches of the same value are one problem, not several.
    others = len(
        {
            p
            for p in (_param(tuple(e.get("loc", ()))) for e in errors)
            if p and p != param and not (param or "").startswith(p)
        }
    )
    more = f" (and {others} more problems)" if others else ""
    return ApiError(400, _explain(first, param) + more, param=param, code=first.get("type"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = _validation_error(exc, request.scope.get("state", {}).get("sent_content_type"))
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if status == 404 and message == "Not Found":
            message = f"no such endpoint: {_request.method} {_request.url.path}"
        return error_response(status, message, code=str(status), headers=exc.headers)

    @app.exception_handler(CacheBlendError)
    async def _user(_request: Request, exc: CacheBlendError) -> JSONResponse:
        return error_response(400, str(exc), code="invalid_request")

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        error = as_api_error(exc)
        return error_response(error.status, error.message, error.param, error.code)
