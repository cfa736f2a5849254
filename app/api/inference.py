"""/v1/chat/completions and /v1/completions: generate with a base model or a fine-tuned adapter."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.schemas.inference import ChatCompletionRequest, CompletionRequest
from app.services import inference

router = APIRouter(prefix="/v1", tags=["inference"])


@router.post("/chat/completions")
def chat_completions(body: ChatCompletionRequest, session: SessionDep, settings: SettingsDep,
                     tenant: TenantDep) -> dict[str, Any]:
    target = inference.resolve_model(session, tenant_id=tenant, settings=settings, name=body.model)
    session.close()  # generation can take seconds; don't hold a connection meanwhile
    return inference.chat_completion(settings, target, body)


@router.post("/completions")
def completions(body: CompletionRequest, session: SessionDep, settings: SettingsDep,
                tenant: TenantDep) -> dict[str, Any]:
    target = inference.resolve_model(session, tenant_id=tenant, settings=settings, name=body.model)
    session.close()
    return inference.completion(settings, target, body)
