"""What a request must pass before any of its body is read: a valid key, and a size under its route's limit.

FastAPI reads and parses a body before it resolves the route's dependencies, so without this anyone without a
key could make the service read (into memory, or a temporary file for multipart) as much as they send, and a
malformed body without a key would answer 400 rather than 401. This ASGI middleware runs first for every /v1
request that carries a body: it checks the key (the same check as `TenantDep`, whose lookup it then spares),
refuses a declared Content-Length over the route's limit before reading a byte, and stops reading a body sent
without one as soon as it passes the limit. The limits: uploads (POST /v1/files) ADAPTERY_MAX_UPLOAD_MB,
adapter imports (POST /v1/adapters) ADAPTERY_MAX_ADAPTER_MB, every other body ADAPTERY_MAX_REQUEST_BODY_KB;
each with a little room for the multipart framing.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import DomainError, TooLarge, http_answer
from app.settings import Settings, get_settings

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
MULTIPART_ROOM = 1 << 20  # the multipart framing and form fields around an uploaded file


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes a route's body may have, and the setting that says so (named in the refusal)."""

    bytes: int
    setting: str
    shown: str
    param: str = "body"
    code: str = "request_too_large"


def body_limit(settings: Settings, method: str, path: str) -> BodyLimit:
    if method == "POST" and path.rstrip("/") == "/v1/files":
        return BodyLimit(settings.max_upload_mb * 2**20 + MULTIPART_ROOM, "ADAPTERY_MAX_UPLOAD_MB",
                         f"{settings.max_upload_mb} MB", "file", "file_too_large")
    if method == "POST" and path.rstrip("/") == "/v1/adapters":
        return BodyLimit(settings.max_adapter_mb * 2**20 + MULTIPART_ROOM, "ADAPTERY_MAX_ADAPTER_MB",
                         f"{settings.max_adapter_mb} MB", "file", "adapter_too_large")
    return BodyLimit(settings.max_request_body_kb * 1024, "ADAPTERY_MAX_REQUEST_BODY_KB",
                     f"{settings.max_request_body_kb} KB")


def _too_large(limit: BodyLimit) -> TooLarge:
    return TooLarge(f"The request body is larger than this route's limit of {limit.shown} ({limit.setting}).",
                    param=limit.param, code=limit.code)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body without a Content-Length has passed its limit. An HTTPException, so that
    FastAPI's body parsing lets it through to the app's error handler (any other error there becomes a 400)."""

    def __init__(self, limit: BodyLimit) -> None:
        self.domain_error = _too_large(limit)  # what the app's error handler answers (app/errors.py)
        super().__init__(status_code=413, detail=self.domain_error.message)


async def _answer(error: DomainError, scope: Scope, receive: Receive, send: Send) -> None:
    status, body, headers = http_answer(error)
    # The body was not read: the client may still be sending it, so the connection is not reused.
    await JSONResponse(body, status_code=status, headers={**headers, "Connection": "close"})(scope, receive, send)


class RequestGuard:
    """The ASGI middleware (the outermost after logging and metrics; see create_app)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        from app.api.deps import verify_before_body  # the routers' module: imported when the first body comes

        settings = get_settings()
        headers = Headers(scope=scope)
        try:
            await verify_before_body(scope, headers.get("authorization"), settings)
        except DomainError as error:
            await _answer(error, scope, receive, send)
            return
        limit = body_limit(settings, scope["method"], scope["path"])
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit.bytes:
            await _answer(_too_large(limit), scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.bytes:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await _answer(_too_large(limit), scope, receive, send)
        except BaseExceptionGroup as group:  # raised inside a task group (a streamed or forwarded body)
            if started or not group.subgroup(_BodyTooLarge) or group.subgroup(lambda e: not isinstance(
                    e, (_BodyTooLarge, BaseExceptionGroup))):
                raise
            await _answer(_too_large(limit), scope, receive, send)
