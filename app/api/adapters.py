"""/v1/adapters: which adapters exist, where each one is (on_disk | cpu | active), pin/load/unload."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.services import inference

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@router.get("")
def list_adapters(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    rows = inference.list_adapters(session, tenant_id=tenant)
    return {"object": "list", "data": [inference.adapter_object(a) for a in rows]}


@router.post("/{adapter_id:path}/pin")
def pin(adapter_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    adapter = inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id)
    inference.pin(settings, adapter, True)
    return inference.adapter_object(adapter)


@router.post("/{adapter_id:path}/unpin")
def unpin(adapter_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    adapter = inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id)
    inference.pin(settings, adapter, False)
    return inference.adapter_object(adapter)


@router.post("/{adapter_id:path}/load")
def load(adapter_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    adapter = inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id)
    inference.preload(settings, adapter)
    return inference.adapter_object(adapter)


@router.post("/{adapter_id:path}/unload")
def unload(adapter_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    adapter = inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id)
    inference.unload(adapter)
    return inference.adapter_object(adapter)


@router.get("/{adapter_id:path}")
def get_adapter(adapter_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return inference.adapter_object(inference.get_adapter(session, tenant_id=tenant, adapter_id=adapter_id))
