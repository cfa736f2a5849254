"""Fine-tuning jobs: creation (validated at submit time), the status state machine, events, checkpoints.

Every status change is one function here and one guarded UPDATE (`... WHERE status IN (expected)`),
so two processes racing on the same job cannot both win. Workers and the API share these functions.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.models import (
    TERMINAL_JOB_STATUSES,
    Adapter,
    AdapterStatus,
    Checkpoint,
    File,
    FileStatus,
    FineTuningJob,
    JobEvent,
    JobStatus,
    now,
)
from app.errors import Conflict, DomainError, InvalidRequest, LimitReached, NotFound, not_found
from app.services import webhooks
from app.services.leases import Leases
from app.settings import Settings


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def storable(key: str) -> bool:
    """Whether an id or name from a request could be stored at all. PostgreSQL text cannot hold NUL, and
    comparing a column with such a string is an error rather than a miss: look it up only when this holds."""
    return "\x00" not in key


# ---------------------------------------------------------------- transitions


_leases = Leases(FineTuningJob, queued=JobStatus.queued, running=JobStatus.running, failed=JobStatus.failed,
                 noun="job", on_transition=webhooks.record_job_outcome)
# The lease transitions (app/services/leases.py) under this module's names, which workers and tests call.
_transition = _leases.transition
mark_enqueued = _leases.mark_enqueued
claim = _leases.claim
renew_lease = _leases.renew


def mark_queued(session: Session, job_id: str) -> bool:
    return _transition(session, job_id, {JobStatus.validating_files}, JobStatus.queued)


def release(session: Session, job_id: str, *, owner: str) -> bool:
    """running → queued, handing the job back (worker shutdown); it resumes from its checkpoint."""
    return _leases.release(session, job_id, owner=owner)


def mark_succeeded(session: Session, job_id: str, *, fine_tuned_model: str, trained_tokens: int,
                   owner: str | None = None) -> bool:
    return _transition(session, job_id, {JobStatus.running}, JobStatus.succeeded, owner=owner, finished_at=now(),
                       fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens, eta_seconds=0.0,
                       lease_expires_at=None)


def mark_failed(session: Session, job_id: str, *, code: str, message: str, param: str | None = None,
                owner: str | None = None) -> bool:
    return _transition(session, job_id, {JobStatus.validating_files, JobStatus.queued, JobStatus.running},
                       JobStatus.failed, owner=owner, finished_at=now(), error_code=code,
                       error_message=message[:2000], error_param=param, lease_expires_at=None)


def mark_cancelled(session: Session, job_id: str, *, from_statuses: set[JobStatus], owner: str | None = None) -> bool:
    return _transition(session, job_id, from_statuses, JobStatus.cancelled, owner=owner, finished_at=now(),
                       lease_expires_at=None)


def reap(session: Session, *, max_attempts: int, requeue_after_seconds: float) -> list[str]:
    """Recover from workers that vanished: jobs whose lease expired go back to the queue (or fail once out
    of attempts), and queued jobs nobody claimed for a while are handed out again. Returns the job ids to
    send to the broker."""
    moment = time.time()
    overdue = list(session.scalars(select(FineTuningJob).where(
        FineTuningJob.status == JobStatus.running.value, FineTuningJob.hard_time_limit.is_not(None),
        FineTuningJob.started_at + FineTuningJob.hard_time_limit < moment)))
    for job in overdue:
        if _transition(session, job.id, {JobStatus.running}, JobStatus.failed, finished_at=now(), error_code="timeout",
                       error_message=f"the job passed its hard time limit of {job.hard_time_limit:.0f} s",
                       lease_expires_at=None):
            add_event(session, job.id, "Hard time limit reached; the job failed.", level="error")

    def lost(job: FineTuningJob, failed: bool) -> None:
        if failed:
            add_event(session, job.id, f"Worker lost on attempt {job.attempts} of {max_attempts}; the job failed.",
                      level="error")
        else:
            add_event(session, job.id, f"Worker lost during attempt {job.attempts}; the job was re-queued and "
                                       "will resume from its latest checkpoint.", level="warn")

    _leases.hand_back_expired(session, moment=moment, max_attempts=max_attempts, on_lost=lost)
    return _leases.unclaimed(session, since=moment - requeue_after_seconds)


def request_cancel(session: Session, job: FineTuningJob) -> FineTuningJob:
    """Queued jobs are cancelled at once; running ones stop at the next step boundary."""
    if job.status in TERMINAL_JOB_STATUSES:
        raise Conflict(f"Job {job.id} has already finished with status '{job.status}' and cannot be "
                       "cancelled.", code="job_not_cancellable")
    if mark_cancelled(session, job.id, from_statuses={JobStatus.validating_files, JobStatus.queued,
                                                      JobStatus.paused}):
        add_event(session, job.id, "Job cancelled before it started.")
    else:
        session.execute(update(FineTuningJob).where(FineTuningJob.id == job.id,
                                                    FineTuningJob.status == JobStatus.running.value)
                        .values(cancel_requested=True))
        session.commit()
        add_event(session, job.id, "Cancellation requested; training stops at the next step.")
    session.refresh(job)
    return job


def stop_requests(session: Session, job_id: str) -> tuple[bool, bool]:
    """(cancel requested, pause requested) for a running job."""
    row = session.execute(select(FineTuningJob.cancel_requested, FineTuningJob.pause_requested)
                          .where(FineTuningJob.id == job_id)).one()
    return bool(row[0]), bool(row[1])


def request_pause(session: Session, job: FineTuningJob) -> FineTuningJob:
    """Queued jobs pause at once; running ones checkpoint at the next step and release their worker."""
    if job.status in TERMINAL_JOB_STATUSES or job.status == JobStatus.paused:
        raise Conflict(f"Job {job.id} is '{job.status}' and cannot be paused.", code="job_not_pausable")
    if _transition(session, job.id, {JobStatus.validating_files, JobStatus.queued}, JobStatus.paused):
        add_event(session, job.id, "Job paused before it started.")
    else:
        session.execute(update(FineTuningJob).where(FineTuningJob.id == job.id,
                                                    FineTuningJob.status == JobStatus.running.value)
                        .values(pause_requested=True))
        session.commit()
        add_event(session, job.id, "Pause requested; training checkpoints and stops at the next step.")
    session.refresh(job)
    return job


def resume(session: Session, job: FineTuningJob) -> FineTuningJob:
    """paused → queued; the caller hands it to the broker. Training resumes from the checkpoint."""
    if not _transition(session, job.id, {JobStatus.paused}, JobStatus.queued, pause_requested=False,
                       enqueued_at=None, lease_owner=None, lease_expires_at=None):
        raise Conflict(f"Job {job.id} is '{job.status}'; only paused jobs can be resumed.",
                       code="job_not_paused")
    add_event(session, job.id, "Job resumed; queued to continue from its latest checkpoint.")
    session.refresh(job)
    return job


def mark_paused(session: Session, job_id: str, *, owner: str) -> bool:
    return _transition(session, job_id, {JobStatus.running}, JobStatus.paused, owner=owner, pause_requested=False,
                       lease_owner=None, lease_expires_at=None)


def record_progress(session: Session, job_id: str, *, step: int, total_steps: int, epoch: float,
                    eta_seconds: float | None) -> None:
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id).values(
        progress_step=step, progress_total_steps=total_steps, progress_epoch=epoch, eta_seconds=eta_seconds,
        progress_at=time.time()))
    session.commit()


def record_result(session: Session, job_id: str, result: dict[str, Any], *, checkpoint_step: int) -> None:
    """Store the job's end report, and add its whole-validation-set metrics to the checkpoint it keeps (as
    OpenAI reports full_valid_* on the final checkpoint)."""
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id).values(result=result))
    checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                         Checkpoint.step_number == checkpoint_step))
    if checkpoint is not None and "full_valid_loss" in result:
        checkpoint.metrics = {**checkpoint.metrics, "full_valid_loss": result["full_valid_loss"],
                              "full_valid_mean_token_accuracy": result["full_valid_mean_token_accuracy"]}
    session.commit()


# ---------------------------------------------------------------- events and checkpoints


def add_event(session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
    # The job row's lock, held until the insert commits: a job's events commit in id order, which the live
    # stream (event_stream.py) relies on to never skip one.
    tenant = session.scalar(select(FineTuningJob.tenant_id).where(FineTuningJob.id == job_id).with_for_update())
    session.add(JobEvent(public_id=new_id("ftevent"), job_id=job_id, tenant_id=tenant or "default",
                         message=message, level=level, type=type, data=data, created_at=now()))
    session.commit()


def list_events(session: Session, job: FineTuningJob, *, after: str | None, limit: int) -> tuple[list[JobEvent], bool]:
    """Newest first, as OpenAI lists them; `after` is an event id from a previous page."""
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after:
        anchor = session.scalar(select(JobEvent.id).where(JobEvent.public_id == after, JobEvent.job_id == job.id)) \
            if storable(after) else None
        if anchor is None:
            raise not_found("event", after, param="after")
        query = query.where(JobEvent.id < anchor)
    rows = list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def add_checkpoint(session: Session, job: FineTuningJob, *, adapter: Adapter, step: int,
                   metrics: dict[str, Any]) -> Checkpoint:
    checkpoint = Checkpoint(id=new_id("ftckpt"), job_id=job.id, tenant_id=job.tenant_id, step_number=step,
                            metrics=metrics, fine_tuned_model_checkpoint=adapter.name, created_at=now())
    session.add(checkpoint)
    session.commit()
    return checkpoint


def list_checkpoints(session: Session, job: FineTuningJob) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)
                                .order_by(Checkpoint.step_number.desc())))


# ---------------------------------------------------------------- reads


def get_job(session: Session, *, tenant_id: str, job_id: str) -> FineTuningJob:
    job = session.get(FineTuningJob, job_id) if storable(job_id) else None
    if job is None or job.tenant_id != tenant_id:
        raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
    return job


def list_jobs(session: Session, *, tenant_id: str, after: str | None, limit: int,
              metadata: dict[str, str] | None = None) -> tuple[list[FineTuningJob], bool]:
    query = select(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id)
    if after:
        anchor = session.get(FineTuningJob, after) if storable(after) else None
        if anchor is None or anchor.tenant_id != tenant_id:
            raise not_found("fine-tuning job", after, param="after")
        query = query.where(FineTuningJob.seq < anchor.seq)
    rows = list(session.scalars(query.order_by(FineTuningJob.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    short = job_id.split("-", 1)[-1][:8]
    return f"ft:{base}:{suffix}:{short}" if suffix else f"ft:{base}:{short}"


# ---------------------------------------------------------------- creation


def _processed_file(session: Session, tenant_id: str, file_id: str, param: str, *,
                    missing: type[DomainError] = InvalidRequest) -> File:
    """The tenant's processed fine-tune file; a missing one raises `missing` (400 in a request body, where
    OpenAI answers 400; 404 where the id is the thing looked up)."""
    file = session.get(File, file_id) if storable(file_id) else None
    if file is None or file.tenant_id != tenant_id or file.deleted:
        raise missing(f"File '{file_id}' does not exist.", param=param, code="invalid_file")
    if file.purpose != "fine-tune":
        raise InvalidRequest(f"File '{file_id}' has purpose '{file.purpose}'; fine-tuning needs purpose 'fine-tune'.",
                             param=param, code="invalid_file")
    if file.status != FileStatus.processed:
        raise InvalidRequest(f"File '{file_id}' is not processed (status '{file.status}'); only processed "
                             "files can be used.", param=param, code="invalid_file")
    return file


def _trainable_base_model(settings: Settings, name: str) -> Any:
    from app.services import base_models

    try:
        return base_models.resolve(settings, name)
    except base_models.UnknownBaseModel:
        available = ", ".join(sorted(base_models.registry(settings)))
        raise NotFound(f"Model '{name}' does not exist or cannot be fine-tuned. Base models: {available}.",
                       param="model", code="model_not_found") from None


# Hyperparameters whose `auto` value depends on the training file's size.
SIZE_DEPENDENT_HYPERPARAMETERS = ("n_epochs", "batch_size")


def method_catalogue(session: Session, *, tenant_id: str, settings: Settings, model: str | None,
                     training_file: str | None) -> list[dict[str, Any]]:
    """Every registered method with its hyperparameter schema and the defaults a job would get."""
    from adapters.methods import DEFAULT_METHOD, METHODS
    from app.services import base_models

    spec = _trainable_base_model(settings, model or settings.default_base_model)
    train = _processed_file(session, tenant_id, training_file, "training_file", missing=NotFound) \
        if training_file else None
    n_examples = (train.n_examples or 0) if train else 0
    info = base_models.base_info(settings, spec)
    catalogue = []
    for method in METHODS.values():
        defaults = method.resolve({}, n_examples=n_examples, settings=settings, base_info=info)
        if not training_file:
            defaults.update({key: "auto" for key in SIZE_DEPENDENT_HYPERPARAMETERS})
        catalogue.append({"id": method.name, "aliases": list(method.aliases), "default": method.name == DEFAULT_METHOD,
                          "hyperparameters": method.hyperparameter_schema(settings), "defaults": defaults})
    return catalogue


def create_job(session: Session, *, tenant_id: str, settings: Settings, model: str, training_file: str,
               validation_file: str | None, suffix: str | None, seed: int | None,
               metadata: dict[str, str] | None, method_type: str | None, raw_hyperparameters: dict[str, Any],
               hyperparameter_param: str, time_limit_seconds: float | None = None,
               from_model: str | None = None, device_class: str | None = None) -> FineTuningJob:
    """Validate everything a worker will need, then store the job as queued (caller enqueues it).

    `method_type` None: the method of `from_model` (or the default method without one)."""
    from adapters.methods import DEFAULT_METHOD, HyperparameterError, accepted_names, method_named
    from app.services import base_models

    spec = _trainable_base_model(settings, model)
    train = _processed_file(session, tenant_id, training_file, "training_file")
    if validation_file:
        valid = _processed_file(session, tenant_id, validation_file, "validation_file")
        if valid.format != train.format:
            raise InvalidRequest(f"validation_file is in the {valid.format} format but training_file is in the "
                                 f"{train.format} format; both must use the same format.",
                                 param="validation_file", code="invalid_file")
    source = _source_adapter(session, tenant_id, from_model, spec.id) if from_model else None
    if method_type is None:
        method_type = source.method if source is not None else DEFAULT_METHOD
    method = method_named(method_type)
    if method is None:
        raise InvalidRequest(f"method.type '{method_type}' is not supported; accepted: {', '.join(accepted_names())}.",
                             param="method.type", code="invalid_method")
    method_type = method.name  # an alias (OpenAI's 'supervised') is stored as the method it names
    try:
        resolved = method.resolve(raw_hyperparameters, n_examples=train.n_examples or 0, settings=settings,
                                  base_info=base_models.base_info(settings, spec))
    except HyperparameterError as exc:
        raise InvalidRequest(str(exc), param=f"{hyperparameter_param}.{exc.param}",
                             code="invalid_hyperparameter") from None
    except ValueError as exc:  # pydantic's ValidationError (unknown field, wrong type)
        raise InvalidRequest(_hyperparameter_message(exc, method_type), param=hyperparameter_param,
                             code="invalid_hyperparameter") from None
    if resolved.get("early_stopping_patience") and not validation_file:
        raise InvalidRequest("early_stopping_patience needs a validation_file to watch the validation loss on.",
                             param=f"{hyperparameter_param}.early_stopping_patience", code="invalid_hyperparameter")
    if source is not None:
        resolved = _continued_hyperparameters(session, source, method_type, raw_hyperparameters, resolved,
                                              hyperparameter_param)
    active = session.scalar(select(func.count()).select_from(FineTuningJob).where(
        FineTuningJob.tenant_id == tenant_id,
        FineTuningJob.status.in_([JobStatus.validating_files.value, JobStatus.queued.value,
                                  JobStatus.running.value, JobStatus.paused.value])))
    if (active or 0) >= settings.max_active_jobs_per_tenant:
        raise LimitReached(f"You have {active} unfinished jobs; at most {settings.max_active_jobs_per_tenant} are "
                           "allowed at once. Wait for one to finish or cancel one.",
                           code="too_many_active_jobs", retry_after=30)
    if time_limit_seconds is not None and time_limit_seconds > settings.max_time_limit_seconds:
        cap = settings.max_time_limit_seconds
        raise InvalidRequest(f"time_limit_seconds is {time_limit_seconds}; at most {cap:.0f} is allowed.",
                             param="time_limit_seconds", code="invalid_value")
    soft = time_limit_seconds
    job = FineTuningJob(
        soft_time_limit=soft, hard_time_limit=None if soft is None else soft + max(60.0, soft * 0.1),
        id=new_id("ftjob"), tenant_id=tenant_id, seq=time.time_ns(), model=spec.id,
        status=JobStatus.validating_files.value, created_at=now(), training_file=train.id,
        validation_file=validation_file, suffix=suffix, seed=seed if seed is not None else secrets.randbelow(2**31),
        method={"type": method_type, method_type: {"hyperparameters": resolved}}, job_metadata=metadata,
        from_model=source.name if source is not None else None, device_class=device_class,
    )
    session.add(job)
    session.commit()
    add_event(session, job.id, f"Validating training file: {train.id}")
    mark_queued(session, job.id)
    add_event(session, job.id, f"Fine-tuning job created ({method_type} on {spec.id}); queued.")
    session.refresh(job)
    return job


def _source_adapter(session: Session, tenant_id: str, name: str, base_model: str) -> Adapter:
    """The fine-tuned model or checkpoint a new job starts from: the tenant's own or a public one, trained here,
    on the same base model."""
    source = adapter_by_name(session, tenant_id=tenant_id, name=name, include_public=True)
    if source is None:
        raise NotFound(f"from_model '{name}' is not a fine-tuned model or checkpoint you can use; list yours with "
                       "GET /v1/models.", param="from_model", code="model_not_found")
    if source.base_model != base_model:
        raise InvalidRequest(f"from_model '{name}' was trained on base model '{source.base_model}', but this job "
                             f"fine-tunes '{base_model}'; a job can only continue an adapter of its own base model.",
                             param="from_model", code="invalid_value")
    if source.job_id is None:
        raise InvalidRequest(f"from_model '{name}' was imported, not trained here; only models and checkpoints of "
                             "fine-tuning jobs can be trained further.", param="from_model", code="invalid_value")
    return source


def _continued_hyperparameters(session: Session, source: Adapter, method_type: str, raw: dict[str, Any],
                               resolved: dict[str, Any], param: str) -> dict[str, Any]:
    """A job that continues `source` trains an adapter of the same method and shape: the shape's values (rank,
    target modules, virtual tokens, ...) come from the source job; given ones must equal them."""
    from adapters.methods import TrainingHyperparameters, method_named

    method = method_named(method_type)
    if source.method != method_type:
        raise InvalidRequest(f"from_model '{source.name}' is a {source.method} adapter; a job continuing it must "
                             f"use method.type '{source.method}' (or give no method).", param="method.type",
                             code="invalid_method")
    if method is not None and not method.continues_from_saved_adapter:
        raise InvalidRequest(f"{method_type} adapters cannot be trained further: the saved adapter keeps the prompt "
                             "encoder's output, not the encoder.", param="from_model", code="invalid_value")
    source_job = session.get(FineTuningJob, source.job_id)
    assert source_job is not None
    shape = {k: v for k, v in source_job.method[method_type]["hyperparameters"].items()
             if k not in TrainingHyperparameters.model_fields}
    for key, value in shape.items():
        if raw.get(key) not in (None, "auto") and raw[key] != value:
            raise InvalidRequest(f"{key} is {raw[key]!r}, but from_model '{source.name}' has {key}={value!r}; a "
                                 "continued adapter keeps its shape.", param=f"{param}.{key}",
                                 code="invalid_hyperparameter")
    return {**resolved, **shape}


def _hyperparameter_message(exc: ValueError, method_type: str) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors()[:10]:
        field = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int)) or "hyperparameters"
        field = field.split(".")[0]
        if err.get("type") == "extra_forbidden":
            parts.append(f"'{field}' is not a hyperparameter of {method_type}")
        else:
            parts.append(f"{field}: {err.get('msg')}")
    return "Invalid hyperparameters: " + "; ".join(dict.fromkeys(parts))


def adapter_by_name(session: Session, *, tenant_id: str, name: str, include_public: bool = False) -> Adapter | None:
    """The tenant's adapter of that name (or, for using it, a public one); None looks like missing."""
    if not storable(name):
        return None
    adapter = session.scalar(select(Adapter).where(Adapter.name == name, Adapter.status == AdapterStatus.ready))
    if adapter is None or not (adapter.tenant_id == tenant_id or (include_public and adapter.public)):
        return None
    return adapter
