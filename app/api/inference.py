"""/v1/chat/completions and /v1/completions: generate with a base model or a fine-tuned adapter.

The routes are async: a request waits for the engine on the event loop, never in the thread pool that every sync
route shares, so however many generations wait, the other routes keep their threads. The short blocking parts
(the database lookup, loading an adapter from disk, tokenising) run in a worker thread each."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
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
# 200 is JSON, or server-sent events with "stream": true; 422: a fine-tuned model that cannot be loaded; 429: the
# tenant's concurrency limit; 503: no adapter slot came free in time; 504: past the generation timeout.
ANSWERS = {200: {"content": EVENT_STREAM}, **errors(400, 401, 404, 422, 429, 503, 504)}


async def _respond(body: Any, session: Any, settings: Any, tenant: str, *, chat: bool) -> Any:
    started = asyncio.get_running_loop().time()  # the generation timeout counts from here

    def resolve() -> Any:
        try:
            return inference.resolve_model(session, tenant_id=tenant, settings=settings, name=body.model)
        finally:
            session.close()  # generation can take seconds; don't hold a connection meanwhile

    claim = inference.claim_generation(settings, tenant, body.n)  # first: a refused request costs no lookup
    try:
        target = await anyio.to_thread.run_sync(resolve)
    except BaseException:
        claim.released = True
        raise
    running = await inference.begin(settings, target, body, chat=chat, tenant=tenant, started=started, claim=claim)
    try:
        if not body.stream:
            return inference.response_body(target, await running.result(), chat=chat, tokenizer=running.tokenizer,
                                           names=inference.tool_names(body))
        # The first event decides the status: a refusal before any token (no slot, the timeout) is an error
        # answer, not a stream that starts and then fails.
        first = await running.first_event()
    except BaseException:
        running.cancel()  # a no-op when it finished; else (an error, this task cancelled) frees its row
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return EventSourceResponse(inference.stream_chunks(target, running, first, chat=chat, include_usage=include_usage,
                                                       names=inference.tool_names(body)),
                               ping=settings.event_stream_ping_seconds)


@router.post("/chat/completions", response_model=ChatCompletion, responses=ANSWERS)
async def chat_completions(body: ChatCompletionRequest, session: SessionDep, settings: SettingsDep,
                           tenant: TenantDep) -> Any:
    return await _respond(body, session, settings, tenant, chat=True)


@router.post("/completions", response_model=TextCompletion, responses=ANSWERS)
async def completions(body: CompletionRequest, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Any:
    return await _respond(body, session, settings, tenant, chat=False)
