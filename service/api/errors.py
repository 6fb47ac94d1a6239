"""Domain errors that carry their HTTP status and machine code, and the JSON error handlers.

Every 4xx/5xx body has the form `{"error": "<machine_code>", "detail": "<human sentence>"}`
(API.md, "Errors"). Routes and services raise `ServiceError` subclasses; one handler turns
them into responses. Framework errors (validation, routing, HTTPException), a database that
cannot be reached and any unexpected exception are mapped to the same body form; no stack
trace ever reaches the client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of the domain errors: `status_code` and `code` travel with the message."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(self, detail: str, *, code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})


class InvalidInput(ServiceError):
    status_code = 422
    code = "invalid_input"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class DependencyDown(ServiceError):
    status_code = 503
    code = "unavailable"


def error_body(code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "detail": detail, **extra}


def error_response(status: int, code: str, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, detail), status_code=status, headers=dict(headers or {}))


# ------------------------------------------------------------------ handlers
async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ServiceError):  # registered for ServiceError only
        raise exc
    return error_response(exc.status_code, exc.code, exc.detail, exc.headers)


def _location(loc: Sequence[Any]) -> str:
    """Dotted field path from a Pydantic location, without the `body`/`query` prefix."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """One sentence naming each offending field: `top_k: Input should be ...; mode: ...`."""
    parts = []
    for err in errors[:5]:
        loc = err.get("loc", ())
        if err.get("type") == "json_invalid":
            parts.append(f"body: not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        message = str(err.get("msg", "invalid value"))
        if err.get("type") == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{_location(loc)}: {message}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts) or "invalid request"


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return error_response(422, "invalid_input", describe_validation_errors(errors))


_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 429: "too_many_requests", 503: "unavailable",
}


async def _http_exception(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    code = _HTTP_CODES.get(exc.status_code, "error" if exc.status_code >= 500 else "bad_request")
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no such endpoint"
    return error_response(exc.status_code, code, detail, exc.headers)


async def _database_down(_: Request, exc: Exception) -> JSONResponse:
    log.warning("database unreachable: %s", exc.__class__.__name__)
    return error_response(503, "database_unavailable", "the database cannot be reached; retry later")


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(InterfaceError, _database_down)
    app.add_exception_handler(Exception, _unexpected)


def invalid_from_load_error(exc: Exception, *, field_prefix: str = "") -> InvalidInput:
    """422 for a `loading` `LoadError`: `invalid_<kind>` naming the offending field."""
    from loading.errors import ModelLoadError, SamplesError, ShardError, UriError

    code = "invalid_input"
    for kind, name in ((UriError, "invalid_uri"), (ModelLoadError, "invalid_model"),
                       (ShardError, "invalid_shard"), (SamplesError, "invalid_samples")):
        if isinstance(exc, kind):
            code = name
            break
    field = str(getattr(exc, "field", "") or "")
    message = str(getattr(exc, "message", "") or exc)
    if field and message.startswith(f"{field}: "):
        message = message[len(field) + 2:]
    if field_prefix and not field.startswith(field_prefix):
        field = f"{field_prefix}.{field}" if field else field_prefix
    path = field or "body"
    return InvalidInput(f"{path}: {message}", code=code)
