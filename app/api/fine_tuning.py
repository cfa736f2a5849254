"""/v1/fine_tuning/jobs: create, list, inspect and cancel jobs; their events and checkpoints."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query

from app import queue
from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.errors import ApiError
from app.schemas.common import paged
from app.schemas.fine_tuning import JobCreate, checkpoint_object, event_object, job_object
from app.services import idempotency, jobs

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=100)]


def _method_and_hyperparameters(body: JobCreate) -> tuple[str, dict[str, Any], str]:
    """Map OpenAI's shapes onto ours: legacy top-level hyperparameters or no method → the default method
    (the registry maps OpenAI's 'supervised' to it too)."""
    from adapters.methods import DEFAULT_METHOD

    if body.method is None:
        return DEFAULT_METHOD, dict(body.hyperparameters or {}), "hyperparameters"
    if body.hyperparameters:
        raise ApiError(400, "Give hyperparameters either at the top level or under method, not both.",
                       param="hyperparameters", code="invalid_request")
    extras = body.method.model_extra or {}
    unexpected = [k for k in extras if k != body.method.type]
    if unexpected:
        raise ApiError(400, f"method has field(s) {unexpected} that do not match method.type "
                            f"'{body.method.type}'.", param=f"method.{unexpected[0]}", code="invalid_request")
    section = extras.get(body.method.type) or {}
    if not isinstance(section, dict) or set(section) - {"hyperparameters"}:
        raise ApiError(400, f"method.{body.method.type} must be an object with only 'hyperparameters'.",
                       param=f"method.{body.method.type}", code="invalid_request")
    raw = section.get("hyperparameters") or {}
    if not isinstance(raw, dict):
        raise ApiError(400, "hyperparameters must be an object.",
                       param=f"method.{body.method.type}.hyperparameters", code="invalid_request")
    return body.method.type, dict(raw), f"method.{body.method.type}.hyperparameters"


@router.post("")
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
               idempotency_key: Annotated[str | None, Header()] = None) -> Any:
    return idempotency.run_once(session, tenant_id=tenant, key=idempotency_key,
                                request_hash=idempotency.body_hash("fine_tuning.job", body.model_dump()),
                                create=lambda: _create_job(body, session, settings, tenant))


def _create_job(body: JobCreate, session: Any, settings: Any, tenant: str) -> dict[str, Any]:
    method_type, raw, param = _method_and_hyperparameters(body)
    job = jobs.create_job(session, tenant_id=tenant, settings=settings, model=body.model,
                          training_file=body.training_file, validation_file=body.validation_file,
                          suffix=body.suffix, seed=body.seed, metadata=body.metadata, method_type=method_type,
                          raw_hyperparameters=raw, hyperparameter_param=param,
                          time_limit_seconds=body.time_limit_seconds)
    if not queue.enqueue_training(job.id):
        # Accepted all the same: the job is committed as queued and the reaper hands it over later.
        jobs.add_event(session, job.id, "The job queue is unreachable right now; the job stays queued and "
                                        "will be handed to a worker when the queue is back.", level="warn")
    return job_object(job)


@router.get("")
def list_jobs(session: SessionDep, tenant: TenantDep, after: str | None = None, limit: Limit = 20) -> dict[str, Any]:
    rows, has_more = jobs.list_jobs(session, tenant_id=tenant, after=after, limit=limit)
    return paged([job_object(r) for r in rows], has_more)


@router.get("/{fine_tuning_job_id}")
def get_job(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return job_object(jobs.get_job(session, tenant_id=tenant, job_id=fine_tuning_job_id))


@router.post("/{fine_tuning_job_id}/cancel")
def cancel_job(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    job = jobs.get_job(session, tenant_id=tenant, job_id=fine_tuning_job_id)
    return job_object(jobs.request_cancel(session, job))


@router.post("/{fine_tuning_job_id}/pause")
def pause_job(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    job = jobs.get_job(session, tenant_id=tenant, job_id=fine_tuning_job_id)
    return job_object(jobs.request_pause(session, job))


@router.post("/{fine_tuning_job_id}/resume")
def resume_job(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    job = jobs.resume(session, jobs.get_job(session, tenant_id=tenant, job_id=fine_tuning_job_id))
    queue.enqueue_training(job.id)  # if the broker is down, the reaper hands it over when it is back
    return job_object(job)


@router.get("/{fine_tuning_job_id}/events")
def list_events(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
    job = jobs.get_job(session, tenant_id=tenant, job_id=fine_tuning_job_id)
    rows, has_more = jobs.list_events(session, job, after=after, limit=limit)
    return paged([event_object(r) for r in rows], has_more)


@router.get("/{fine_tuning_job_id}/checkpoints")
def list_checkpoints(fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None,
                     limit: Limit = 10) -> dict[str, Any]:
    job = jobs.get_job(session, tenant_id=tenant, job_id=fine_tuning_job_id)
    rows = jobs.list_checkpoints(session, job)
    if after:
        ids = [r.id for r in rows]
        if after not in ids:
            raise ApiError(404, f"No checkpoint found with id '{after}'.", param="after", code="not_found")
        rows = rows[ids.index(after) + 1:]
    return paged([checkpoint_object(r) for r in rows[:limit]], len(rows) > limit)
