"""Domain errors the services raise, and the one place that turns them (and FastAPI's own errors) into HTTP
answers in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("adaptery")


class DomainError(Exception):
    """Something the caller asked for cannot be done. Services say what and why; they know nothing of HTTP."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        # Seconds after which the same request may succeed (a busy slot, a limit), when that is known.
        self.retry_after = retry_after


class InvalidRequest(DomainError):
    """The request is malformed or names something unusable; `param` names the field."""


class Unauthorized(DomainError):
    """No API key, or one that is not valid for this route."""


class Forbidden(DomainError):
    """The caller may see the object but not do this to it (a tenant deleting a base model, the operator's)."""


class NotFound(DomainError):
    """The object does not exist for this caller (another tenant's objects look the same)."""


class Conflict(DomainError):
    """The object's current state does not allow this (a finished job, a pinned adapter, a reused key)."""


class TooLarge(DomainError):
    """An upload is over its size limit."""


class Unprocessable(DomainError):
    """Well-formed, but the server cannot use it (an adapter that does not fit or does nothing)."""


class LimitReached(DomainError):
    """A rate limit or quota; `retry_after` says when to try again."""


class Unavailable(DomainError):
    """Something this request needs is down (no inference replica answers); worth retrying later."""


class TimedOut(DomainError):
    """The request ran past its time limit and was ended (a generation longer than the generation timeout)."""


# The one mapping from domain errors to HTTP statuses.
HTTP_STATUS: dict[type[DomainError], int] = {
    InvalidRequest: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404, Conflict: 409, TooLarge: 413,
    Unprocessable: 422, LimitReached: 429, Unavailable: 503, TimedOut: 504,
}


def not_found(kind: str, identifier: str, param: str | None = None) -> NotFound:
    return NotFound(f"No {kind} found with id '{identifier}'.", param=param, code="not_found")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def http_status(exc: DomainError) -> int:
    return next(HTTP_STATUS[cls] for cls in type(exc).__mro__ if cls in HTTP_STATUS)


def http_answer(exc: DomainError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, body and headers for a domain error (also what an idempotent replay stores)."""
    status = http_status(exc)
    error_type = "rate_limit_error" if isinstance(exc, LimitReached) else "invalid_request_error"
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return status, error_body(exc.message, error_type, exc.param, exc.code), headers


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    messages = []
    first_param = None
    for err in errors[:10]:
        param = _loc_to_param(tuple(err.get("loc", ())))
        first_param = first_param or param or None
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (not accepted here)"
        messages.append(f"{param or 'body'}: {msg}")
    return "Invalid request: " + "; ".join(messages), first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        status, body, headers = http_answer(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(getattr(exc, "domain_error", None), DomainError):  # one of ours, raised where only an
            return await _domain_error(request, exc.domain_error)  # type: ignore[attr-defined]  # HTTPException passes
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(app, request)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                            status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("The server had an error processing your request.", "server_error"),
                            status_code=500)

    _document_validation_errors_as_400(app)


def _allowed_methods(app: FastAPI, request: Request) -> str:
    """Every method of the path the request was matched to. Starlette's own Allow names only the methods of
    the first route that matched, and a path here often has one route per method (GET and POST /v1/files)."""
    routes = list(iter_route_contexts(app.routes))
    # The first route whose path matches is the one routing chose, as Starlette does.
    matched = next((r for r in routes if r.matches({**request.scope, "method": ""})[0] != Match.NONE), None)
    if matched is None:
        return ""
    return ", ".join(sorted(set().union(*(r.methods or set() for r in routes if r.path == matched.path))))


def _document_validation_errors_as_400(app: FastAPI) -> None:
    """FastAPI documents a 422 `HTTPValidationError` on every route with parameters; the handler above answers
    those errors with 400 in the error shape (each route documents its 400), so drop FastAPI's 422 from the
    document. A route whose own 422 applies declares it and keeps it."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        for item in document.get("paths", {}).values():
            for operation in item.values():
                responses = operation.get("responses", {})
                schema = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("$ref", "").endswith("/HTTPValidationError"):
                    del responses["422"]
        schemas = document.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
