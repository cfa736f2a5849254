"""/v1/admin: tenants and their API keys (admin key only). A key is shown once, when it is created. Also what only the
operator may do to any tenant's adapter: make it public, or unpin it (pins are a per-tenant quota; this frees one);
and the base models: register one (checked first), list them, remove one registered here."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import AdminDep, SessionDep, SettingsDep
from app.db.models import Adapter, ApiKey, Tenant
from app.errors import not_found
from app.schemas.adapters import AdapterObject
from app.schemas.admin import (
    AdapterVisibility,
    ApiKeyCreated,
    ApiKeyObject,
    BaseModelCreate,
    BaseModelDeleted,
    BaseModelObject,
    TenantCreate,
    TenantCreated,
    TenantObject,
    Visibility,
)
from app.schemas.common import ListResponse, listed
from app.schemas.errors import errors
from app.services import base_model_admin, inference, tenants
from app.services.ids import storable

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def _tenant(row: Tenant) -> dict[str, Any]:
    return {"id": row.id, "object": "tenant", "name": row.name, "created_at": row.created_at}


def _key(row: ApiKey) -> dict[str, Any]:
    return {"id": row.id, "object": "api_key", "tenant_id": row.tenant_id, "prefix": row.prefix,
            "created_at": row.created_at, "revoked_at": row.revoked_at}


@router.post("/tenants", response_model=TenantCreated, responses=errors(400, 401))
def create_tenant(body: TenantCreate, session: SessionDep, _: AdminDep) -> dict[str, Any]:
    tenant, key = tenants.create_tenant(session, name=body.name)
    return {**_tenant(tenant), "api_key": key}


@router.get("/tenants", response_model=ListResponse[TenantObject], responses=errors(401))
def list_tenants(session: SessionDep, _: AdminDep) -> dict[str, Any]:
    rows = session.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id))
    return listed([_tenant(t) for t in rows])


@router.post("/tenants/{tenant_id}/keys", response_model=ApiKeyCreated, responses=errors(401, 404))
def create_key(tenant_id: str, session: SessionDep, _: AdminDep) -> dict[str, Any]:
    if not storable(tenant_id) or session.get(Tenant, tenant_id) is None:
        raise not_found("tenant", tenant_id, param="tenant_id")
    row, key = tenants.add_key(session, tenant_id=tenant_id)
    return {**_key(row), "api_key": key}


@router.post("/adapters/{adapter_id}/visibility", response_model=AdapterVisibility, responses=errors(400, 401, 404))
def set_visibility(adapter_id: str, body: Visibility, session: SessionDep, _: AdminDep) -> dict[str, Any]:
    """Mark an adapter public (every tenant may use it by name) or private again."""
    adapter = session.get(Adapter, adapter_id) if storable(adapter_id) else None
    if adapter is None:
        raise not_found("adapter", adapter_id, param="adapter_id")
    adapter.public = body.public
    session.commit()
    return {"id": adapter.id, "object": "adapter", "name": adapter.name, "public": adapter.public}


@router.post("/adapters/{adapter_id}/unpin", response_model=AdapterObject, responses=errors(401, 404, 503))
async def unpin_adapter(adapter_id: str, session: SessionDep, settings: SettingsDep, _: AdminDep) -> dict[str, Any]:
    """Unpin any tenant's adapter in every serving process (role api: on every inference replica)."""
    adapter = await anyio.to_thread.run_sync(lambda: session.get(Adapter, adapter_id) if storable(adapter_id) else None)
    if adapter is None:
        raise not_found("adapter", adapter_id, param="adapter_id")
    if settings.role == "api":
        from app.services import routing

        await routing.get_router().unpin_everywhere(adapter.id)
    else:
        inference.unpin_everywhere(adapter.id)
    return await anyio.to_thread.run_sync(inference.adapter_object, adapter)


@router.delete("/keys/{key_id}", response_model=ApiKeyObject, responses=errors(401, 404))
def revoke_key(key_id: str, session: SessionDep, _: AdminDep) -> dict[str, Any]:
    return _key(tenants.revoke_key(session, key_id=key_id))


@router.post("/base_models", response_model=BaseModelObject, responses=errors(400, 401, 409))
def register_base_model(body: BaseModelCreate, session: SessionDep, settings: SettingsDep,
                        _: AdminDep) -> dict[str, Any]:
    """Register a base model from a folder (or a hub id), once its checks pass: architecture, tokenizer, chat
    template, parameters, context length, dtype and the memory it needs on this host's device. A refusal names the
    first problem."""
    return base_model_admin.register(session, settings, model_id=body.id, source=body.source)


@router.get("/base_models", response_model=ListResponse[BaseModelObject], responses=errors(401))
def list_base_models(session: SessionDep, settings: SettingsDep, _: AdminDep) -> dict[str, Any]:
    """Every base model: the packaged default, ADAPTERY_BASE_MODELS' and those registered here."""
    return listed(base_model_admin.listing(session, settings))


@router.delete("/base_models/{model_id:path}", response_model=BaseModelDeleted, responses=errors(401, 404, 409))
def remove_base_model(model_id: str, session: SessionDep, settings: SettingsDep, _: AdminDep) -> dict[str, Any]:
    """Remove a base model registered here (not one the settings declare, nor one jobs or adapters still use)."""
    base_model_admin.remove(session, settings, model_id=model_id)
    return {"id": model_id, "object": "base_model", "deleted": True}
