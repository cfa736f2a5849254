"""Role api: the routes that need the serving engine, forwarded to an inference replica (app/services/routing.py)
with the same paths, bodies and answers as in one process. This process checks the key and resolves the
model (to know which adapter a request is for) and never imports torch."""

from __future__ import annotations

import tempfile
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from app.api.adapters import IMPORT_BODY
from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.db.session import get_sessionmaker
from app.schemas.adapters import AdapterObject
from app.schemas.errors import errors
from app.schemas.inference import EVENT_STREAM, ChatCompletion, ChatCompletionRequest, CompletionRequest, TextCompletion
from app.services import inference, routing
from app.services.lifetimes import released_at_end

router = APIRouter()
SPOOL_IN_MEMORY = 1 << 20  # a forwarded body larger than this waits on disk
ANSWERS = {200: {"content": EVENT_STREAM}, **errors(400, 401, 404, 422, 429, 503, 504)}


def _adapter_of(tenant: str, settings: Any, model: str) -> str | None:
    with get_sessionmaker()() as session:
        target = inference.resolve_model(session, tenant_id=tenant, settings=settings, name=model)
        return target.adapter.id if target.adapter is not None else None


async def _generate(request: Request, path: str, model: str, settings: Any, tenant: str,
                    n: int) -> StreamingResponse:
    # The tenant's concurrency limit, counted here too (per API process): a tenant's refused flood then stops at
    # the API and never reaches the replica, whose process runs the decode loop.
    claim = inference.claim_generation(settings, tenant, n)
    try:
        adapter_id = await anyio.to_thread.run_sync(_adapter_of, tenant, settings, model)
        response = await routing.get_router().forward(request, path, await request.body(), adapter_id)
    except BaseException:
        claim.released = True
        raise
    response.body_iterator = released_at_end(response.body_iterator, claim.release)
    return response


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ANSWERS, tags=["inference"])
async def chat_completions(request: Request, body: ChatCompletionRequest, settings: SettingsDep,
                           tenant: TenantDep) -> StreamingResponse:
    return await _generate(request, "/v1/chat/completions", body.model, settings, tenant, body.n)


@router.post("/v1/completions", response_model=TextCompletion, responses=ANSWERS, tags=["inference"])
async def completions(request: Request, body: CompletionRequest, settings: SettingsDep,
                      tenant: TenantDep) -> StreamingResponse:
    return await _generate(request, "/v1/completions", body.model, settings, tenant, body.n)


@router.post("/v1/adapters", response_model=AdapterObject, responses=errors(400, 401, 404, 409, 413, 422, 429, 503),
             openapi_extra=IMPORT_BODY, tags=["adapters"])
async def import_adapter(request: Request, tenant: TenantDep) -> StreamingResponse:
    """Importing loads the adapter to check it against the base model: a replica does it. The body (up to
    ADAPTERY_MAX_ADAPTER_MB, app/request_guard.py) goes through a temporary file, never whole in memory."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spooled:
        async for chunk in request.stream():
            await anyio.to_thread.run_sync(spooled.write, chunk)
        return await routing.get_router().forward(request, "/v1/adapters", spooled, None)


async def _residency_action(request: Request, session: Any, tenant: str, adapter_id: str,
                            action: str) -> StreamingResponse:
    adapter = await anyio.to_thread.run_sync(lambda: inference.get_adapter(session, tenant_id=tenant,
                                                                           adapter_id=adapter_id))
    return await routing.get_router().forward(request, f"/v1/adapters/{adapter.id}/{action}", b"", adapter.id)


def _residency_route(action: str, statuses: tuple[int, ...]) -> None:
    async def route(adapter_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> StreamingResponse:
        return await _residency_action(request, session, tenant, adapter_id, action)

    route.__name__ = f"{action}_adapter"
    router.post(f"/v1/adapters/{{adapter_id:path}}/{action}", response_model=AdapterObject,
                responses=errors(*statuses), tags=["adapters"])(route)


# On the replica that holds the adapter (or should own it): pinning and loading are per replica.
for _action, _statuses in (("pin", (401, 404, 409, 422, 429, 503)), ("unpin", (401, 404, 429, 503)),
                           ("load", (401, 404, 409, 422, 429, 503)), ("unload", (401, 404, 409, 429, 503))):
    _residency_route(_action, _statuses)
