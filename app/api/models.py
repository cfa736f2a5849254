"""/v1/models: the base models and the caller's fine-tuned adapters, as OpenAI model objects."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Query
from sqlalchemy import select

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.db.models import Adapter, AdapterStatus
from app.errors import NotFound
from app.schemas.adapters import ModelDeleted, ModelObject
from app.schemas.common import ListResponse, listed
from app.schemas.errors import errors
from app.services.inference import adapter_by_name

router = APIRouter(prefix="/v1/models", tags=["models"])
BOOT_TIME = 0
PUBLIC_OWNER = "public"  # owned_by of another tenant's public adapter


def _base_objects(settings: Any) -> list[dict[str, Any]]:
    from app.services import base_model_admin, base_models

    objects = []
    for model_id, spec in base_models.registry(settings).items():
        facts = base_model_admin.describe(settings, spec)
        objects.append({"id": model_id, "object": "model", "created": BOOT_TIME, "owned_by": "system", "parent": None,
                        **{key: facts[key] for key in ("family", "parameters", "context_length", "methods")}})
    return objects


def _adapter_object(adapter: Adapter, tenant: str) -> dict[str, Any]:
    if adapter.tenant_id != tenant:
        # Another tenant's public adapter: its id is the only name it has for the caller (names are per tenant),
        # and nothing of its owner (tenant, job) shows.
        return {"id": adapter.id, "object": "model", "created": adapter.created_at, "owned_by": PUBLIC_OWNER,
                "parent": adapter.base_model, "method": adapter.method, "job_id": None}
    return {"id": adapter.name, "object": "model", "created": adapter.created_at, "owned_by": adapter.tenant_id,
            "parent": adapter.base_model, "method": adapter.method, "job_id": adapter.job_id}


@router.get("", response_model=ListResponse[ModelObject], responses=errors(401, 429))
def list_models(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    adapters = session.scalars(select(Adapter).where((Adapter.tenant_id == tenant) | Adapter.public,
                                                     Adapter.status == AdapterStatus.ready)
                               .order_by(Adapter.created_at, Adapter.name))
    return listed(_base_objects(settings) + [_adapter_object(a, tenant) for a in adapters])


@router.get("/{model_id:path}", response_model=ModelObject, responses=errors(401, 404, 429))
def get_model(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    for obj in _base_objects(settings):
        if obj["id"] == model_id:
            return obj
    adapter = adapter_by_name(session, tenant_id=tenant, name=model_id, include_public=True)
    if adapter is None:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return _adapter_object(adapter, tenant)


@router.delete("/{model_id:path}", response_model=ModelDeleted, responses=errors(400, 401, 403, 404, 409, 429))
async def delete_model(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                       keep_checkpoints: bool = Query(default=False, description="keep the job's checkpoints when its "
                                                                                  "final model is deleted")
                       ) -> dict[str, Any]:
    """Delete one of your fine-tuned models or imported adapters (OpenAI's shape). Requests already running on it
    finish; new ones get 404. Its job's checkpoints go with a job's final model unless keep_checkpoints; refused
    (409) while a job that has not ended continues from it."""
    from app.services import adapter_lifecycle

    deleted = await anyio.to_thread.run_sync(lambda: adapter_lifecycle.delete_model(
        session, settings, tenant_id=tenant, model=model_id, keep_checkpoints=keep_checkpoints))
    if settings.role == "api":
        from app.services import routing

        await routing.get_router().drop_everywhere(deleted)
    else:
        await anyio.to_thread.run_sync(adapter_lifecycle.drop_everywhere, deleted)
    return adapter_lifecycle.deleted_object(model_id)

