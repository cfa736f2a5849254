"""Creating a job: everything a worker will need is validated at submit time (files, base model, method and
resolved hyperparameters, the model it continues, the tenant's limits), then the job is stored as queued; the
caller hands it to the broker. Also the catalogue of methods with the defaults a job would get."""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters.methods.base import ResolvedHyperparameters
from app.db.models import Adapter, FineTuningJob, JobStatus, now
from app.errors import InvalidRequest, LimitReached, NotFound
from app.services import quotas
from app.services.datasets import processed_fine_tune_file
from app.services.ids import new_id
from app.services.inference import adapter_by_name
from app.services.jobs.history import add_event
from app.services.jobs.transitions import mark_queued
from app.settings import Settings


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    short = job_id.split("-", 1)[-1][:8]
    return f"ft:{base}:{suffix}:{short}" if suffix else f"ft:{base}:{short}"


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
    train = processed_fine_tune_file(session, tenant_id, training_file, "training_file", missing=NotFound) \
        if training_file else None
    n_examples = (train.n_examples or 0) if train else 0
    info = base_models.base_info(settings, spec)
    catalogue = []
    for method in METHODS.values():
        defaults = method.resolve({}, n_examples=n_examples, settings=settings, base_info=info).model_dump()
        if not training_file:
            defaults.update({key: "auto" for key in SIZE_DEPENDENT_HYPERPARAMETERS})
        catalogue.append({"id": method.name, "aliases": list(method.aliases), "default": method.name == DEFAULT_METHOD,
                          "hyperparameters": method.hyperparameter_schema(settings), "defaults": defaults})
    return catalogue


def create_job(session: Session, *, tenant_id: str, settings: Settings, model: str, training_file: str,
               validation_file: str | None, suffix: str | None, seed: int | None,
               metadata: dict[str, str] | None, method_type: str | None, raw_hyperparameters: dict[str, Any],
               hyperparameter_param: str, time_limit_seconds: float | None = None,
               from_model: str | None = None, device_class: str | None = None,
               graders: list[dict[str, Any]] | None = None) -> FineTuningJob:
    """Validate everything a worker will need, then store the job as queued (caller enqueues it).

    `method_type` None: the method of `from_model` (or the default method without one)."""
    from adapters.methods import DEFAULT_METHOD, HyperparameterError, accepted_names, method_named
    from app.services import base_models

    # Before any validation: a refusal costs one query.
    quotas.check_job_creations(session, tenant_id=tenant_id, settings=settings)
    spec = _trainable_base_model(settings, model)
    train = processed_fine_tune_file(session, tenant_id, training_file, "training_file")
    if validation_file:
        valid = processed_fine_tune_file(session, tenant_id, validation_file, "validation_file")
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
    _check_objective_and_file(resolved, train.format, hyperparameter_param)
    if resolved.early_stopping_patience and not validation_file:
        raise InvalidRequest("early_stopping_patience needs a validation_file to watch the validation loss on.",
                             param=f"{hyperparameter_param}.early_stopping_patience", code="invalid_hyperparameter")
    if graders:
        _check_job_graders(settings, graders, spec.id, validation_file, resolved.objective)
    if source is not None:
        resolved = _continued_hyperparameters(session, source, method_type, raw_hyperparameters, resolved,
                                              hyperparameter_param)
    active = session.scalar(select(func.count()).select_from(FineTuningJob).where(
        FineTuningJob.tenant_id == tenant_id,
        FineTuningJob.status.in_([JobStatus.validating_files.value, JobStatus.queued.value,
                                  JobStatus.running.value, JobStatus.paused.value])))
    if (active or 0) >= settings.max_active_jobs_per_tenant:
        raise LimitReached(f"You have {active} unfinished jobs; at most {settings.max_active_jobs_per_tenant} are "
                           "allowed at once (ADAPTERY_MAX_ACTIVE_JOBS_PER_TENANT). Wait for one to finish or "
                           "cancel one.",
                           code="too_many_active_jobs", retry_after=30)
    # A job makes adapters (its result, its checkpoints): none starts once the tenant is at its adapter quota.
    quotas.check_adapters(session, tenant_id=tenant_id, settings=settings)
    if time_limit_seconds is not None and time_limit_seconds > settings.max_time_limit_seconds:
        cap = settings.max_time_limit_seconds
        raise InvalidRequest(f"time_limit_seconds is {time_limit_seconds}; at most {cap:.0f} is allowed.",
                             param="time_limit_seconds", code="invalid_value")
    # No job runs unbounded unless the operator says so: one that asks for no limit gets the default.
    soft = time_limit_seconds if time_limit_seconds is not None else (
        min(settings.default_time_limit_seconds, settings.max_time_limit_seconds)
        if settings.default_time_limit_seconds > 0 else None)
    job = FineTuningJob(
        soft_time_limit=soft, hard_time_limit=None if soft is None else soft + max(60.0, soft * 0.1),
        id=new_id("ftjob"), tenant_id=tenant_id, seq=time.time_ns(), model=spec.id,
        status=JobStatus.validating_files.value, created_at=now(), training_file=train.id,
        validation_file=validation_file, suffix=suffix, seed=seed if seed is not None else secrets.randbelow(2**31),
        method={"type": method_type, method_type: {"hyperparameters": resolved.model_dump()}}, job_metadata=metadata,
        from_model=source.name if source is not None else None, device_class=device_class, graders=graders,
    )
    session.add(job)
    session.commit()
    add_event(session, job.id, f"Validating training file: {train.id}")
    mark_queued(session, job.id)
    add_event(session, job.id, f"Fine-tuning job created ({method_type} on {spec.id}); queued.")
    session.refresh(job)
    return job


def _check_job_graders(settings: Settings, graders: list[dict[str, Any]], base_model: str,
                       validation_file: str | None, objective: str) -> None:
    """A job's graders grade its end report: the answers of a supervised job on its validation file, scored by the
    job's base model where a grader asks a model (the worker holds no other)."""
    from adapters.graders import score_models
    from adapters.methods.base import PREFERENCE_OBJECTIVES
    from app.services import base_models

    if not validation_file:
        raise InvalidRequest("graders grade the end report's answers on the validation_file; give one.",
                             param="graders", code="invalid_value")
    if objective in PREFERENCE_OBJECTIVES:
        raise InvalidRequest(f"graders grade a supervised job's answers; a {objective} job reports preference "
                             "figures instead.", param="graders", code="invalid_value")
    for index, grader in enumerate(graders):
        for scoring in score_models(grader):
            try:
                named = base_models.resolve(settings, scoring["model"]).id
            except base_models.UnknownBaseModel:
                named = None
            if named != base_model:
                raise InvalidRequest(f"graders[{index}]: a job's score_model grader scores with the job's base model "
                                     f"'{base_model}', not '{scoring['model']}' (an evaluation may score with any "
                                     "model on it).", param=f"graders[{index}].model", code="invalid_value")


def _check_objective_and_file(resolved: ResolvedHyperparameters, file_format: str | None, param: str) -> None:
    """Each objective trains on its own format: preference pairs for dpo, orpo and simpo, feedback for kto, and
    the supervised formats for the supervised objective."""
    from adapters.methods.base import OBJECTIVE_FORMATS

    needed = OBJECTIVE_FORMATS.get(resolved.objective)
    shapes = {"preference": 'lines {"input": {"messages": [...]}, "preferred_output": [...], '
                            '"non_preferred_output": [...]}',
              "feedback": 'lines {"input": {"messages": [...]}, "output": [...], "label": true or false}'}
    if needed is None and file_format in shapes:
        objectives = [name for name, form in OBJECTIVE_FORMATS.items() if form == file_format]
        raise InvalidRequest(f"training_file is in the {file_format} format, which trains the "
                             f"{' or '.join(objectives)} objective; give the method's objective (method.type 'dpo' "
                             "sets dpo), or upload supervised examples.", param="training_file", code="invalid_file")
    if needed is not None and file_format != needed:
        raise InvalidRequest(f"The {resolved.objective} objective trains on a file in the {needed} format, but "
                             f"training_file is in the {file_format} format; upload {shapes[needed]}.",
                             param="training_file", code="invalid_file")


def _source_adapter(session: Session, tenant_id: str, name: str, base_model: str) -> Adapter:
    """The fine-tuned model or checkpoint a new job starts from: the tenant's own, trained here, on the same base
    model. Never another tenant's public adapter: public is for inference, and a short job with a tiny learning
    rate would hand its weights back as the caller's own model, which it may download (the owner's may not be).
    So it answers exactly as a missing model does; the worker checks again at run time (workers/runner.py)."""
    source = adapter_by_name(session, tenant_id=tenant_id, name=name)
    if source is None:
        raise NotFound(f"from_model '{name}' is not one of your fine-tuned models or checkpoints; a job continues "
                       "only your own (another tenant's public model can be used for inference, not trained "
                       "further). Yours: GET /v1/adapters.", param="from_model", code="model_not_found")
    if source.base_model != base_model:
        raise InvalidRequest(f"from_model '{name}' was trained on base model '{source.base_model}', but this job "
                             f"fine-tunes '{base_model}'; a job can only continue an adapter of its own base model.",
                             param="from_model", code="invalid_value")
    if source.job_id is None:
        raise InvalidRequest(f"from_model '{name}' was imported, not trained here; only models and checkpoints of "
                             "fine-tuning jobs can be trained further.", param="from_model", code="invalid_value")
    return source


def _continued_hyperparameters(session: Session, source: Adapter, method_type: str, raw: dict[str, Any],
                               resolved: ResolvedHyperparameters, param: str) -> ResolvedHyperparameters:
    """A job that continues `source` trains an adapter of the same method and shape: the shape's values (rank,
    target modules, virtual tokens, ...) come from the source job; given ones must equal them."""
    from adapters.methods import method_named

    method = method_named(method_type)
    if source.method != method_type:
        raise InvalidRequest(f"from_model '{source.name}' is a {source.method} adapter; a job continuing it must "
                             f"use method.type '{source.method}' (or give no method).", param="method.type",
                             code="invalid_method")
    source_job = session.get(FineTuningJob, source.job_id)
    assert source_job is not None and method is not None
    trained_with = method.stored(source_job.method[method_type]["hyperparameters"])
    if not method.continues_from_saved_adapter(trained_with):
        raise InvalidRequest(f"from_model '{source.name}' cannot be trained further: its saved adapter keeps the "
                             "prompt encoder's output, not the encoder.", param="from_model", code="invalid_value")
    shape = trained_with.shape()
    for key, value in shape.items():
        if raw.get(key) not in (None, "auto") and raw[key] != value:
            raise InvalidRequest(f"{key} is {raw[key]!r}, but from_model '{source.name}' has {key}={value!r}; a "
                                 "continued adapter keeps its shape.", param=f"{param}.{key}",
                                 code="invalid_hyperparameter")
    return resolved.model_copy(update=shape)


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
