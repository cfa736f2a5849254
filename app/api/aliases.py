"""/v1/aliases: a tenant's stable model names, each pointing at one of its models at a time; promote, roll back,
list with history, delete (app/services/aliases.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.schemas.adapters import AliasObject, AliasPromote
from app.schemas.common import ListResponse, listed
from app.schemas.errors import errors
from app.services import aliases

router = APIRouter(prefix="/v1/aliases", tags=["models"])


@router.get("", response_model=ListResponse[AliasObject], responses=errors(401, 429))
def list_aliases(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return listed([aliases.alias_object(session, a) for a in aliases.list_aliases(session, tenant_id=tenant)])


@router.put("/{alias}", response_model=AliasObject, responses=errors(400, 401, 404, 409, 422, 429))
def promote(alias: str, body: AliasPromote, session: SessionDep, settings: SettingsDep,
            tenant: TenantDep) -> dict[str, Any]:
    """Point the alias (created if new) at one of your models or checkpoints. Requests already running finish on the
    version they started with; new ones get this one."""
    changed = aliases.promote(session, settings, tenant_id=tenant, alias=alias, model=body.model)
    return aliases.alias_object(session, changed)


@router.post("/{alias}/rollback", response_model=AliasObject, responses=errors(401, 404, 409, 429))
def rollback(alias: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """Point the alias back at what it pointed to before its latest change."""
    return aliases.alias_object(session, aliases.rollback(session, tenant_id=tenant, alias=alias))


@router.get("/{alias}", response_model=AliasObject, responses=errors(401, 404, 429))
def get_alias(alias: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    found = aliases.get_alias(session, tenant_id=tenant, alias=alias)
    return aliases.alias_object(session, found, with_history=True)


@router.delete("/{alias}", response_model=AliasObject, responses=errors(401, 404, 429))
def delete_alias(alias: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """Remove the alias (the model it pointed to stays)."""
    found = aliases.alias_object(session, aliases.get_alias(session, tenant_id=tenant, alias=alias))
    aliases.remove(session, tenant_id=tenant, alias=alias)
    return found
