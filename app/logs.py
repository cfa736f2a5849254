"""Log lines of the API and the workers: one JSON object per line (ADAPTERY_LOG_FORMAT=json) or plain text,
each carrying the request id, tenant, job and evaluation it belongs to, where there is one.

Those come from context variables: the API's middleware sets the request id (the client's X-Request-ID,
or a new one, returned in the response) and logs one line per request, with the tenant authentication
found; a worker sets the job or evaluation id for the length of a task. A filter on the handler copies them into
every record, so library loggers (uvicorn, Celery) get them too.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
tenant_id: ContextVar[str | None] = ContextVar("tenant_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)
evaluation_id: ContextVar[str | None] = ContextVar("evaluation_id", default=None)
CONTEXT = {"request_id": request_id, "tenant": tenant_id, "job_id": job_id, "evaluation_id": evaluation_id}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("adaptery.http")


class ContextFilter(logging.Filter):
    """Copies the context variables that are set into the record (as attributes the formatters show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, variable in CONTEXT.items():
            value = variable.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


def printable(text: str) -> str:
    """`text` with every non-printable character escaped (a newline as \\n, an escape as \\x1b): a message may
    carry what a tenant sent (a file name, a model name), and in a text log a newline forges a line and a terminal
    escape rewrites what an operator sees."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class TextFormatter(logging.Formatter):
    """The plain format, with the context in brackets when there is any; one line per message (a traceback
    follows on its own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = printable(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT if hasattr(record, name))
        return f"{line} [{context}]" if context else line


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                             rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
    return TextFormatter(TEXT_FORMAT)


@contextmanager
def bound(**values: str | None) -> Iterator[None]:
    """Set context variables (job_id=…, tenant=…) for the lines logged inside the block."""
    tokens = [(CONTEXT[name], CONTEXT[name].set(value)) for name, value in values.items()]
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


def use_format(handler: logging.Handler, kind: str) -> None:
    """Give a handler (ours, or one a library made) the chosen format and the context filter."""
    handler.setFormatter(formatter(kind))
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())


def configure(kind: str, level: str = "INFO") -> None:
    """One stderr handler on the root logger in the chosen format; uvicorn's loggers go through it too."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "adaptery", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.adaptery = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    use_format(handler, kind)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        library = logging.getLogger(name)
        for own in list(library.handlers):
            library.removeHandler(own)
        library.propagate = True
    # httpx logs every request the service makes at INFO (each replica poll, each forwarded chat, each webhook);
    # the service's own lines say what matters. At DEBUG they show.
    logging.getLogger("httpx").setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)


def route_template(request: Any) -> str | None:
    """The matched route's path template (`/v1/fine_tuning/jobs/{fine_tuning_job_id}`), or None: what logs and
    metrics label a request with, so ids never become labels."""
    return getattr(request.scope.get("route"), "path", None)


QUIET_ROUTES = frozenset({"/internal/state"})
# The API's own key on the requests it forwards to an inference replica (app/services/routing.py).
INTERNAL_HEADER = "x-adaptery-internal-key"


def forwarded_by_api(request: Any, settings: Any) -> bool:
    """An inference replica's request that the API process forwarded (it carries the shared internal key)."""
    given = request.headers.get(INTERNAL_HEADER, "")
    return bool(settings.role == "inference" and settings.internal_key and given
                and hmac.compare_digest(given.encode(), settings.internal_key.encode()))


def from_the_api(request: Any, status: int) -> bool:
    """On an inference replica, a request the API process forwarded, or its poll of the replica's state (unless
    refused): the API logs and counts the client's request itself, under the same request id. Never true in another
    role, so no client can keep its requests out of the log or the metrics."""
    from app.settings import get_settings

    settings = get_settings()
    if settings.role != "inference" or status == 401:
        return False
    return route_template(request) in QUIET_ROUTES or forwarded_by_api(request, settings)


async def record_request(request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
    """Middleware: a request id for the request's log lines and its response, and one line per request."""
    incoming = request.headers.get("x-request-id", "")
    # Printable ASCII only: it goes back in a header and on to the replicas (httpx encodes headers as ASCII).
    rid = (incoming if 0 < len(incoming) <= 128 and incoming.isascii() and incoming.isprintable()
           else f"req-{secrets.token_hex(8)}")
    token = request_id.set(rid)
    started = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        response.headers["X-Request-ID"] = rid
        return response
    finally:
        route = route_template(request)
        extra = {"status": status, "duration_ms": round((time.perf_counter() - started) * 1000, 1), "route": route}
        tenant = getattr(request.state, "tenant", None)  # set by authentication (in another thread's context)
        if tenant:
            extra["tenant"] = tenant
        # Once per request: the API's line; the router's poll of each replica (every ADAPTERY_ROUTING_POLL_SECONDS)
        # would fill the log.
        level = logging.DEBUG if from_the_api(request, status) else logging.INFO
        log.log(level, "%s %s %s", request.method, route or request.url.path, status, extra=extra)
        request_id.reset(token)
