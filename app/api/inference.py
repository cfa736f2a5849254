"""/v1/chat/completions and /v1/completions: generate with a base model or a fine-tuned adapter."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.schemas.errors import errors
from app.schemas.inference import (
    EVENT_STREAM,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    TextCompletion,
)
from app.services import inference

router = APIRouter(prefix="/v1", tags=["inference"])
# 200 is JSON, or server-sent events with "stream": true; 422: a fine-tuned model that cannot be loaded.
ANSWERS = {200: {"content": EVENT_STREAM}, **errors(400, 401, 404, 422, 429)}


def _respond(body: Any, session: Any, settings: Any, tenant: str, *, chat: bool) -> Any:
    target = inference.resolve_model(session, tenant_id=tenant, settings=settings, name=body.model)
    session.close()  # generation can take seconds; don't hold a connection meanwhile
    sequence = inference.start(settings, target, body, chat=chat)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(inference.stream_chunks(target, sequence, chat=chat, include_usage=include_usage),
                                   ping=settings.event_stream_ping_seconds)
    return inference.response_body(target, sequence.wait(), chat=chat)


@router.post("/chat/completions", response_model=ChatCompletion, responses=ANSWERS)
def chat_completions(body: ChatCompletionRequest, session: SessionDep, settings: SettingsDep,
                     tenant: TenantDep) -> Any:
    return _respond(body, session, settings, tenant, chat=True)


@router.post("/completions", response_model=TextCompletion, responses=ANSWERS)
def completions(body: CompletionRequest, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Any:
    return _respond(body, session, settings, tenant, chat=False)
