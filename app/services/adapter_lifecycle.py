"""Deleting a tenant's fine-tuned model or imported adapter (OpenAI's DELETE /v1/models/{model}): refused while a job
builds on it, its job's checkpoints with it unless kept, its files removed, and every serving process told to drop
it (requests in flight finish on it; no new one reaches it)."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.store import ArtifactStore
from app.db.models import TERMINAL_JOB_STATUSES, Adapter, AdapterStatus, FineTuningJob
from app.errors import Conflict, Forbidden, NotFound
from app.services import base_models
from app.services.inference import adapter_by_name
from app.settings import Settings

log = logging.getLogger("adaptery")


def deleted_name(adapter: Adapter) -> str:
    """The name a deleted adapter keeps, so that its tenant may use the name again (names are unique per tenant)."""
    return f"{adapter.name}#deleted-{adapter.id}"[:255]


def delete_model(session: Session, settings: Settings, *, tenant_id: str, model: str,
                 keep_checkpoints: bool = False) -> list[str]:
    """Mark the tenant's model (and, for a job's final model, the job's checkpoints unless kept) deleted; return the
    adapter ids deleted, for the serving processes to drop. Its stored files go after the commit."""
    if model in base_models.registry(settings) or model in base_models.DEFAULT_ALIASES:
        raise Forbidden(f"'{model}' is a base model; base models are removed by the operator "
                        "(DELETE /v1/admin/base_models/{id}).", param="model", code="base_model")
    adapter = adapter_by_name(session, tenant_id=tenant_id, name=model, aliases=False)
    if adapter is None:  # another tenant's (public or not) looks missing, as everywhere
        from app.services.aliases import target_of

        hint = " (it is an alias: DELETE /v1/aliases/{alias})" if target_of(session, tenant_id=tenant_id,
                                                                             name=model) else ""
        raise NotFound(f"The model '{model}' does not exist or is not yours to delete{hint}.", param="model",
                       code="model_not_found")
    doomed = [adapter]
    if not keep_checkpoints and adapter.job_id is not None:
        job = session.get(FineTuningJob, adapter.job_id)
        if job is not None and job.fine_tuned_model == adapter.name:
            doomed += session.scalars(select(Adapter).where(
                Adapter.job_id == adapter.job_id, Adapter.id != adapter.id, Adapter.tenant_id == tenant_id,
                Adapter.status == AdapterStatus.ready)).all()
    names = [a.name for a in doomed]
    from app.services.aliases import aliases_of

    pointing = [alias for row in doomed for alias in aliases_of(session, tenant_id=tenant_id, adapter_id=row.id)]
    if pointing:
        raise Conflict(f"The model '{model}' (or a checkpoint deleted with it) is what alias(es) "
                       f"{', '.join(pointing)} point to; promote another model to them or delete them first.",
                       param="model", code="model_in_use")
    building = session.scalars(select(FineTuningJob.id).where(
        FineTuningJob.tenant_id == tenant_id, FineTuningJob.from_model.in_(names),
        FineTuningJob.status.not_in([s.value for s in TERMINAL_JOB_STATUSES]))).all()
    if building:
        raise Conflict(f"The model '{model}' (or a checkpoint deleted with it) is the from_model of job(s) "
                       f"{', '.join(building)}, which have not ended; cancel them or wait.", param="model",
                       code="model_in_use")
    for row in doomed:
        row.status = AdapterStatus.deleted
        row.name = deleted_name(row)
        row.public = False
    session.commit()
    store = ArtifactStore.for_settings(settings)
    for row in doomed:
        try:
            store.delete_adapter(row.id)
        except OSError as exc:  # the row is deleted; a file left behind is only space, said in the log
            log.warning("adapter %s deleted, but its files were not removed: %s", row.id, exc)
    return [row.id for row in doomed]


def deleted_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "deleted": True}


def drop_everywhere(adapter_ids: list[str]) -> None:
    """Drop deleted adapters from every runtime of this process, on each one's scheduler thread (between two decode
    steps); one that a request still uses goes when that request ends."""
    from app.services.inference import engine_if_started

    engine = engine_if_started()
    for runtime in (engine.runtimes().values() if engine is not None else []):
        for adapter_id in adapter_ids:
            runtime.call(lambda key=adapter_id, cache=runtime.adapters: cache.drop(key))
