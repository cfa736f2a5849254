"""/v1/fine_tuning/jobs: create, list, inspect and cancel jobs; their events and checkpoints. /v1/fine_tuning/methods:
what a job may train."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema
from sse_starlette.sse import EventSourceResponse

from app import queue
from app.api.deps import IdempotencyKey, JobDep, SessionDep, SettingsDep, TenantDep
from app.errors import InvalidRequest, NotFound
from app.schemas.common import ListResponse, PagedList, listed, paged
from app.schemas.errors import errors
from app.schemas.fine_tuning import (
    CheckpointObject,
    EventObject,
    JobCreate,
    JobObject,
    MethodObject,
    MetricsSeries,
    checkpoint_object,
    event_object,
    job_object,
)
from app.services import event_stream, idempotency, job_metrics, jobs
from app.services.lifetimes import released_at_end

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
methods_router = APIRouter(tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=100)]
# A query parameter is sent or not, never null (SkipJsonSchema keeps null out of the document).
After = Annotated[str | SkipJsonSchema[None], Query(description="the last id of the previous page")]
# OpenAI's method.type for preference tuning: an objective, trained by a PEFT method (the default one or from_model's).
DPO = "dpo"


def _method_and_hyperparameters(body: JobCreate) -> tuple[str | None, dict[str, Any], str]:
    """Map OpenAI's shapes onto ours: legacy top-level hyperparameters or no method → the default method
    (the registry maps OpenAI's 'supervised' to it too); no method with from_model → from_model's method. OpenAI's
    'dpo' is the dpo objective on from_model's method (the SFT-then-DPO recipe) or the default method; any method
    trains for it with its `objective` hyperparameter set to 'dpo'."""
    from adapters.methods import DEFAULT_METHOD

    if body.method is None:
        method = None if body.from_model else DEFAULT_METHOD
        return method, dict(body.hyperparameters or {}), "hyperparameters"
    if body.hyperparameters:
        raise InvalidRequest("Give hyperparameters either at the top level or under method, not both.",
                             param="hyperparameters", code="invalid_request")
    extras = body.method.model_extra or {}
    unexpected = [k for k in extras if k != body.method.type]
    if unexpected:
        raise InvalidRequest(f"method has field(s) {unexpected} that do not match method.type "
                             f"'{body.method.type}'.", param=f"method.{unexpected[0]}", code="invalid_request")
    # Absent or null means no hyperparameters; anything else must be an object, as the document says.
    section = extras.get(body.method.type)
    section = {} if section is None else section
    if not isinstance(section, dict) or set(section) - {"hyperparameters"}:
        raise InvalidRequest(f"method.{body.method.type} must be an object with only 'hyperparameters'.",
                             param=f"method.{body.method.type}", code="invalid_request")
    raw = section.get("hyperparameters")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise InvalidRequest("hyperparameters must be an object.",
                             param=f"method.{body.method.type}.hyperparameters", code="invalid_request")
    param = f"method.{body.method.type}.hyperparameters"
    if body.method.type == DPO:
        if raw.get("objective") not in (None, "auto", DPO):
            raise InvalidRequest(f"method.type 'dpo' trains for the dpo objective; objective is {raw['objective']!r} "
                                 "(another preference objective goes with a method's type, e.g. {\"type\": "
                                 "\"lora\", \"lora\": {\"hyperparameters\": {\"objective\": \"simpo\"}}}).",
                                 param=f"{param}.objective", code="invalid_hyperparameter")
        return (None if body.from_model else DEFAULT_METHOD), {**raw, "objective": DPO}, param
    return body.method.type, dict(raw), param


@router.post("", response_model=JobObject, responses=errors(400, 401, 404, 409, 429))
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
               idempotency_key: IdempotencyKey = None) -> Any:
    return idempotency.run_once(session, tenant_id=tenant, key=idempotency_key,
                                request_hash=idempotency.body_hash("fine_tuning.job", body.model_dump()),
                                create=lambda: _create_job(body, session, settings, tenant))


def _create_job(body: JobCreate, session: Any, settings: Any, tenant: str) -> dict[str, Any]:
    method_type, raw, param = _method_and_hyperparameters(body)
    job = jobs.create_job(session, tenant_id=tenant, settings=settings, model=body.model,
                          training_file=body.training_file, validation_file=body.validation_file,
                          suffix=body.suffix, seed=body.seed, metadata=body.metadata, method_type=method_type,
                          raw_hyperparameters=raw, hyperparameter_param=param,
                          time_limit_seconds=body.time_limit_seconds, from_model=body.from_model,
                          device_class=body.device_class,
                          graders=[g.model_dump() for g in body.graders or []] or None)
    if not queue.enqueue_training(job.id):
        # Accepted all the same: the job is committed as queued and the reaper hands it over later.
        jobs.add_event(session, job.id, "The job queue is unreachable right now; the job stays queued and "
                                        "will be handed to a worker when the queue is back.", level="warn")
    return job_object(job)


@router.get("", response_model=PagedList[JobObject], responses=errors(400, 401, 404, 429))
def list_jobs(session: SessionDep, tenant: TenantDep, after: After = None, limit: Limit = 20) -> dict[str, Any]:
    rows, has_more = jobs.list_jobs(session, tenant_id=tenant, after=after, limit=limit)
    return paged([job_object(r) for r in rows], has_more)


@methods_router.get("/v1/fine_tuning/methods", response_model=ListResponse[MethodObject],
                    responses=errors(400, 401, 404, 429))
def list_methods(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                 model: Annotated[str | SkipJsonSchema[None], Query(
                     description="the base model the defaults are for (default: the server's default)")] = None,
                 training_file: Annotated[str | SkipJsonSchema[None], Query(
                     description="a processed file: defaults that depend on its size are resolved for it")] = None,
                 ) -> dict[str, Any]:
    """The fine-tuning methods this server trains, each with its hyperparameter schema and defaults."""
    return listed(jobs.method_catalogue(session, tenant_id=tenant, settings=settings, model=model,
                                        training_file=training_file))


@router.get("/{fine_tuning_job_id}", response_model=JobObject, responses=errors(401, 404, 429))
def get_job(job: JobDep) -> dict[str, Any]:
    return job_object(job)


@router.post("/{fine_tuning_job_id}/cancel", response_model=JobObject, responses=errors(401, 404, 409, 429))
def cancel_job(job: JobDep, session: SessionDep) -> dict[str, Any]:
    job = jobs.request_cancel(session, job)
    queue.send_held_training(job.id)  # a queued job that left frees its tenant's place for a held one
    return job_object(job)


@router.post("/{fine_tuning_job_id}/pause", response_model=JobObject, responses=errors(401, 404, 409, 429))
def pause_job(job: JobDep, session: SessionDep) -> dict[str, Any]:
    job = jobs.request_pause(session, job)
    queue.send_held_training(job.id)
    return job_object(job)


@router.post("/{fine_tuning_job_id}/resume", response_model=JobObject, responses=errors(401, 404, 409, 429))
def resume_job(job: JobDep, session: SessionDep) -> dict[str, Any]:
    job = jobs.resume(session, job)
    queue.enqueue_training(job.id)  # if the broker is down, the reaper hands it over when it is back
    return job_object(job)


STREAM_DOC = ("With stream=true: server-sent events, the job's events oldest first and then each new one as it "
              "happens (event `fine_tuning.job.event`, id = the event's id, data = the event object), ending with "
              "an `end` event ({id, status}) when the job has finished. Reconnect with the Last-Event-ID header "
              "to continue after the last event received, without gaps or duplicates.")


@router.get("/{fine_tuning_job_id}/events", response_model=PagedList[EventObject],
            responses={**errors(400, 401, 404, 429),
                       200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": STREAM_DOC}})
def list_events(request: Request, job: JobDep, session: SessionDep, settings: SettingsDep,
                after: After = None, limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                stream: Annotated[bool, Query(description=STREAM_DOC)] = False,
                last_event_id: Annotated[str | SkipJsonSchema[None], Header(max_length=200)] = None) -> Any:
    if stream:
        after_seq = event_stream.resume_point(job.id, last_event_id)
        # The stream polls with sessions of its own; this one would otherwise keep its pooled connection until
        # the stream ends (the dependency closes it after the response), and 15 open streams would drain the pool.
        session.close()
        release = event_stream.open_streams.take(job.tenant_id, settings.max_open_streams_per_tenant)
        events = released_at_end(event_stream.job_events(job.id, after_seq=after_seq,
                                                         poll_seconds=settings.event_stream_poll_seconds,
                                                         key_hash=request.state.key_hash), release)
        return EventSourceResponse(events, ping=settings.event_stream_ping_seconds)
    rows, has_more = jobs.list_events(session, job, after=after, limit=limit)
    return paged([event_object(r) for r in rows], has_more)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=PagedList[CheckpointObject],
            responses=errors(400, 401, 404, 429))
def list_checkpoints(job: JobDep, session: SessionDep, after: After = None, limit: Limit = 10) -> dict[str, Any]:
    rows = jobs.list_checkpoints(session, job)
    if after:
        ids = [r.id for r in rows]
        if after not in ids:
            raise NotFound(f"No checkpoint found with id '{after}'.", param="after", code="not_found")
        rows = rows[ids.index(after) + 1:]
    return paged([checkpoint_object(r) for r in rows[:limit]], len(rows) > limit)


@router.get("/{fine_tuning_job_id}/metrics", response_model=MetricsSeries, responses=errors(400, 401, 404, 429))
def job_metrics_series(job: JobDep, session: SessionDep,
                       from_step: Annotated[int, Query(ge=0, description="first step to return")] = 0,
                       to_step: Annotated[Annotated[int, Field(ge=0)] | SkipJsonSchema[None],
                                          Query(description="last step to return")] = None,
                       max_points: Annotated[int, Query(ge=2, le=10_000, description=(
                           "the most points to return; a longer range is thinned to every k-th step (the answer's "
                           "stride) and its last"))] = 1000,
                       ) -> dict[str, Any]:
    """The job's training curves (what its TensorBoard event files hold), one point per logged step."""
    points, stride = job_metrics.downsampled(job_metrics.read(session, job.id, from_step=from_step,
                                                              to_step=to_step), max_points)
    return {"object": "fine_tuning.job.metrics", "fine_tuning_job_id": job.id, "data": points, "stride": stride}
