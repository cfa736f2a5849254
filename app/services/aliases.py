"""Model aliases: a tenant's stable name for one of its adapters at a time (what applications call), promoted to
another adapter or checkpoint or rolled back in one guarded update, with the history of every change. A request
resolves the alias when it starts, to the adapter's id (the engine's cache key), so a request in flight finishes on
the version it started with and no cache entry of one version can answer for another."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Adapter, AdapterStatus, AliasPromotion, ModelAlias, now
from app.errors import Conflict, InvalidRequest, NotFound
from app.services import quotas
from app.services.ids import storable

# As an import's name (app/services/adapter_import.py): letters, digits, '.', '_', ':' and '-'.
ALIAS_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
FINE_TUNED_PREFIX = "ft:"
# The changes of an alias kept in its history (the latest ones).
ALIAS_HISTORY = 100


def target_of(session: Session, *, tenant_id: str, name: str) -> Adapter | None:
    """The ready adapter the tenant's alias `name` points to now, or None (no such alias)."""
    if not storable(name):
        return None
    alias = session.get(ModelAlias, (tenant_id, name))
    if alias is None:
        return None
    adapter = session.get(Adapter, alias.adapter_id)
    return adapter if adapter is not None and adapter.status == AdapterStatus.ready else None


def aliases_of(session: Session, *, tenant_id: str, adapter_id: str) -> list[str]:
    """The tenant's aliases that point to this adapter now."""
    return list(session.scalars(select(ModelAlias.name).where(ModelAlias.tenant_id == tenant_id,
                                                              ModelAlias.adapter_id == adapter_id)))


def _check_name(session: Session, settings: Any, tenant_id: str, name: str) -> None:
    from app.services import base_models

    if not ALIAS_PATTERN.fullmatch(name):
        raise InvalidRequest("an alias is 1-100 characters: letters, digits, '.', '_', ':' and '-'", param="alias",
                             code="invalid_alias")
    if name[:3].lower() == FINE_TUNED_PREFIX:
        raise InvalidRequest(f"an alias may not start with '{FINE_TUNED_PREFIX}': that prefix names models "
                             "fine-tuned here", param="alias", code="reserved_name")
    if name in base_models.registry(settings) or session.scalar(select(Adapter.id).where(
            Adapter.tenant_id == tenant_id, Adapter.name == name)) is not None:
        raise Conflict(f"'{name}' already names a model; an alias needs a name of its own", param="alias",
                       code="name_taken")


def _own_model(session: Session, tenant_id: str, model: str) -> Adapter:
    from app.services.inference import adapter_by_name

    adapter = adapter_by_name(session, tenant_id=tenant_id, name=model)
    if adapter is None or adapter.tenant_id != tenant_id:
        raise NotFound(f"The model '{model}' is not one of your fine-tuned models, checkpoints or imports.",
                       param="model", code="model_not_found")
    return adapter


def promote(session: Session, settings: Any, *, tenant_id: str, alias: str, model: str) -> ModelAlias:
    """Point `alias` (created if new) at the tenant's model or checkpoint `model`, in one transaction."""
    adapter = _own_model(session, tenant_id, model)
    current = session.get(ModelAlias, (tenant_id, alias)) if storable(alias) else None
    previous = current.adapter_id if current is not None else None
    if current is None:
        _check_name(session, settings, tenant_id, alias)
        quotas.check_aliases(session, tenant_id=tenant_id, settings=settings)
        session.add(ModelAlias(tenant_id=tenant_id, name=alias, adapter_id=adapter.id, updated_at=now()))
    elif not session.execute(update(ModelAlias).where(  # guarded: the history's `previous` is what was replaced
            ModelAlias.tenant_id == tenant_id, ModelAlias.name == alias, ModelAlias.adapter_id == previous)
            .values(adapter_id=adapter.id, updated_at=now())).rowcount:  # type: ignore[attr-defined]
        session.rollback()
        raise _changed(alias)
    session.add(AliasPromotion(tenant_id=tenant_id, alias=alias, adapter_id=adapter.id,
                               previous_adapter_id=previous, action="promote", created_at=now()))
    _trim_history(session, tenant_id, alias)
    try:
        session.commit()
    except IntegrityError:  # another request created the alias first
        session.rollback()
        raise _changed(alias) from None
    return get_alias(session, tenant_id=tenant_id, alias=alias)


def _trim_history(session: Session, tenant_id: str, alias: str) -> None:
    """Keep an alias's last ALIAS_HISTORY changes: a tenant promoting in a loop grows no table without end."""
    session.flush()
    older = session.scalars(select(AliasPromotion.id).where(AliasPromotion.tenant_id == tenant_id,
                                                            AliasPromotion.alias == alias)
                            .order_by(AliasPromotion.id.desc()).offset(ALIAS_HISTORY)).all()
    if older:
        session.execute(delete(AliasPromotion).where(AliasPromotion.id.in_(older)))


def _changed(alias: str) -> Conflict:
    return Conflict(f"The alias '{alias}' changed meanwhile; read it and try again.", param="alias",
                    code="alias_changed")


def rollback(session: Session, *, tenant_id: str, alias: str) -> ModelAlias:
    """Point `alias` back at what it pointed to before its latest change; guarded, so that two rollbacks (or a
    rollback racing a promotion) cannot both apply to the same version."""
    current = get_alias(session, tenant_id=tenant_id, alias=alias)
    latest = session.scalar(select(AliasPromotion).where(AliasPromotion.tenant_id == tenant_id,
                                                         AliasPromotion.alias == alias)
                            .order_by(AliasPromotion.id.desc()).limit(1))
    if latest is None or latest.previous_adapter_id is None:
        raise Conflict(f"The alias '{alias}' has no earlier version to roll back to.", param="alias",
                       code="no_previous_version")
    target = session.get(Adapter, latest.previous_adapter_id)
    if target is None or target.status != AdapterStatus.ready:
        raise Conflict(f"The version before the current one of '{alias}' was deleted; promote another model.",
                       param="alias", code="previous_version_deleted")
    changed = session.execute(update(ModelAlias).where(
        ModelAlias.tenant_id == tenant_id, ModelAlias.name == alias, ModelAlias.adapter_id == current.adapter_id)
        .values(adapter_id=target.id, updated_at=now())).rowcount  # type: ignore[attr-defined]
    if not changed:
        session.rollback()
        raise _changed(alias)
    session.add(AliasPromotion(tenant_id=tenant_id, alias=alias, adapter_id=target.id,
                               previous_adapter_id=current.adapter_id, action="rollback", created_at=now()))
    _trim_history(session, tenant_id, alias)
    session.commit()
    return get_alias(session, tenant_id=tenant_id, alias=alias)


def get_alias(session: Session, *, tenant_id: str, alias: str) -> ModelAlias:
    found = session.get(ModelAlias, (tenant_id, alias)) if storable(alias) else None
    if found is None:
        raise NotFound(f"No alias named '{alias}'.", param="alias", code="not_found")
    session.refresh(found)
    return found


def remove(session: Session, *, tenant_id: str, alias: str) -> None:
    session.delete(get_alias(session, tenant_id=tenant_id, alias=alias))
    session.commit()


def list_aliases(session: Session, *, tenant_id: str) -> list[ModelAlias]:
    return list(session.scalars(select(ModelAlias).where(ModelAlias.tenant_id == tenant_id)
                                .order_by(ModelAlias.name)))


def history(session: Session, *, tenant_id: str, alias: str) -> list[AliasPromotion]:
    return list(session.scalars(select(AliasPromotion).where(AliasPromotion.tenant_id == tenant_id,
                                                             AliasPromotion.alias == alias)
                                .order_by(AliasPromotion.id)))


def alias_object(session: Session, alias: ModelAlias, *, with_history: bool = False) -> dict[str, Any]:
    def name_of(adapter_id: str | None) -> str | None:
        adapter = session.get(Adapter, adapter_id) if adapter_id else None
        return adapter.name if adapter is not None and adapter.status == AdapterStatus.ready else None

    obj: dict[str, Any] = {"id": alias.name, "object": "model.alias", "model": name_of(alias.adapter_id),
                           "adapter_id": alias.adapter_id, "updated_at": alias.updated_at}
    if with_history:
        obj["history"] = [{"action": p.action, "model": name_of(p.adapter_id), "adapter_id": p.adapter_id,
                           "previous_adapter_id": p.previous_adapter_id, "created_at": p.created_at}
                          for p in history(session, tenant_id=alias.tenant_id, alias=alias.name)]
    return obj
