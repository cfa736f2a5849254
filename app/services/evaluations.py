"""On-demand evaluations: validation at submit time, reads, and the status transitions a worker makes.

An evaluation compares models on one base model (the base itself, fine-tuned models, checkpoints) on one
uploaded file. It runs on a training worker and is owned by lease while it runs, as a job is: every status
change is one guarded UPDATE, so a duplicate delivery or a worker that lost its lease changes nothing.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.data import SUPERVISED_FORMATS
from app.db.models import Evaluation, EvaluationStatus, now
from app.errors import InvalidRequest, NotFound, not_found
from app.services import datasets
from app.services.ids import new_id, storable
from app.services.inference import adapter_by_name
from app.services.leases import Leases
from app.settings import Settings

MAX_MODELS = 8


# ---------------------------------------------------------------- creation


def create_evaluation(session: Session, *, tenant_id: str, settings: Settings, file: str, models: list[str],
                      metadata: dict[str, str] | None, graders: list[dict[str, Any]] | None = None) -> Evaluation:
    """Check that every model can be evaluated on the file, then store the evaluation as queued (the caller
    hands it to the broker). `graders` have been checked for shape; their scoring models are resolved here."""
    from app.services import quotas

    quotas.check_evaluations(session, tenant_id=tenant_id, settings=settings)
    targets = _resolve_models(session, tenant_id=tenant_id, settings=settings, models=models)
    grading = _resolve_scorers(session, tenant_id=tenant_id, settings=settings, graders=graders,
                               base_model=targets[0]["base_model"]) if graders else None
    processed = datasets.processed_fine_tune_file(session, tenant_id, file, "file")
    if processed.format not in SUPERVISED_FORMATS:
        raise InvalidRequest(f"File '{processed.id}' is in the {processed.format} format, for preference jobs; an "
                             "evaluation scores answers against a file in one of the formats "
                             f"{', '.join(SUPERVISED_FORMATS)}. A preference job reports its figures on its "
                             "validation_file.", param="file", code="invalid_file")
    evaluation = Evaluation(
        id=new_id("eval"), tenant_id=tenant_id, seq=time.time_ns(), status=EvaluationStatus.queued.value,
        created_at=now(), file=processed.id, base_model=targets[0]["base_model"], models=list(models),
        targets=[{"model": t["model"], "adapter_id": t["adapter_id"]} for t in targets], grading=grading,
        eval_metadata=metadata)
    session.add(evaluation)
    session.commit()
    return evaluation


def _resolve_scorers(session: Session, *, tenant_id: str, settings: Settings, graders: list[dict[str, Any]],
                     base_model: str) -> dict[str, Any]:
    """{"graders", "scorers"}: each score_model grader's model resolved as the evaluated models are, and on the
    same base model (the worker scores with the base model it has loaded)."""
    from adapters.graders import score_models

    scorers: dict[str, dict[str, Any]] = {}
    for index, grader in enumerate(graders):
        inner = "" if grader["type"] == "score_model" else ".graders.{}"
        for scoring in score_models(grader):
            name = next((key for key, g in grader.get("graders", {}).items() if g is scoring), "")
            param = f"graders[{index}]{inner.format(name)}.model"
            try:
                target = _resolve_models(session, tenant_id=tenant_id, settings=settings,
                                         models=[scoring["model"]])[0]
            except (InvalidRequest, NotFound) as exc:
                exc.param = param
                raise
            if target["base_model"] != base_model:
                raise InvalidRequest(f"{param} '{scoring['model']}' is on base model '{target['base_model']}'; a "
                                     f"scoring model must be the evaluation's base model '{base_model}' or "
                                     "fine-tuned from it.", param=param, code="mixed_base_models")
            scorers[scoring["model"]] = {"model": scoring["model"], "adapter_id": target["adapter_id"]}
    return {"graders": graders, "scorers": list(scorers.values())}


def _resolve_models(session: Session, *, tenant_id: str, settings: Settings,
                    models: list[str]) -> list[dict[str, Any]]:
    """Each model as {"model", "adapter_id" (None for the base model), "base_model"}; a model that is unknown
    (or another tenant's), listed twice or on another base model than the first is refused, naming models[i]."""
    from app.services import base_models

    if not 1 <= len(models) <= MAX_MODELS:
        raise InvalidRequest(f"models must list 1 to {MAX_MODELS} models; got {len(models)}.", param="models",
                             code="invalid_value")
    accepted = ("a base model id, the name of one of your fine-tuned models or checkpoints, or a public model's id "
                "(GET /v1/models lists them)")
    targets: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for index, name in enumerate(models):
        param = f"models[{index}]"
        try:
            target = {"model": name, "adapter_id": None, "base_model": base_models.resolve(settings, name).id}
        except base_models.UnknownBaseModel:
            adapter = adapter_by_name(session, tenant_id=tenant_id, name=name, include_public=True)
            if adapter is None:
                raise NotFound(f"The model '{name}' does not exist; each model must be {accepted}.", param=param,
                               code="model_not_found") from None
            target = {"model": name, "adapter_id": adapter.id, "base_model": adapter.base_model}
        key = str(target["adapter_id"] or target["base_model"])  # an alias of a base model is that base model
        if key in seen:
            raise InvalidRequest(f"models[{index}] '{name}' is the same model as models[{seen[key]}]; list each "
                                 "model once.", param=param, code="duplicate_model")
        seen[key] = index
        if targets and target["base_model"] != targets[0]["base_model"]:
            raise InvalidRequest(f"models[{index}] '{name}' is on base model '{target['base_model']}' but models[0] "
                                 f"'{models[0]}' is on '{targets[0]['base_model']}'; every model of one evaluation "
                                 "must be that base model or fine-tuned from it.", param=param,
                                 code="mixed_base_models")
        targets.append(target)
    return targets


# ---------------------------------------------------------------- reads


def get_evaluation(session: Session, *, tenant_id: str, evaluation_id: str) -> Evaluation:
    evaluation = session.get(Evaluation, evaluation_id) if storable(evaluation_id) else None
    if evaluation is None or evaluation.tenant_id != tenant_id:
        raise not_found("evaluation", evaluation_id, param="evaluation_id")
    return evaluation


def list_evaluations(session: Session, *, tenant_id: str, after: str | None,
                     limit: int) -> tuple[list[Evaluation], bool]:
    """Newest first; `after` is the last id of the previous page."""
    query = select(Evaluation).where(Evaluation.tenant_id == tenant_id)
    if after:
        anchor = session.get(Evaluation, after) if storable(after) else None
        if anchor is None or anchor.tenant_id != tenant_id:
            raise not_found("evaluation", after, param="after")
        query = query.where(Evaluation.seq < anchor.seq)
    rows = list(session.scalars(query.order_by(Evaluation.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def unfinished_using_file(session: Session, file_id: str) -> str | None:
    """An evaluation that has not finished and reads this file, if any (the file must stay until it has)."""
    return session.scalar(select(Evaluation.id).where(
        Evaluation.file == file_id,
        Evaluation.status.in_([EvaluationStatus.queued.value, EvaluationStatus.running.value])).limit(1))


# ---------------------------------------------------------------- transitions


_leases = Leases(Evaluation, queued=EvaluationStatus.queued, running=EvaluationStatus.running,
                 failed=EvaluationStatus.failed, noun="evaluation", lane=("tenant_id", "base_model"))
# The lease transitions (app/services/leases.py), as for jobs, under the names workers and tests call.
_transition = _leases.transition
mark_enqueued = _leases.mark_enqueued
reserve_send = _leases.reserve_send
unreserve = _leases.unreserve
held = _leases.held
claim = _leases.claim
renew_lease = _leases.renew


def release(session: Session, evaluation_id: str, *, owner: str) -> bool:
    """running → queued, handing the evaluation back (worker shutdown); it runs again from the start."""
    return _leases.release(session, evaluation_id, owner=owner)


def mark_succeeded(session: Session, evaluation_id: str, *, results: list[dict[str, Any]], owner: str) -> bool:
    return _transition(session, evaluation_id, {EvaluationStatus.running}, EvaluationStatus.succeeded, owner=owner,
                       results=results, finished_at=now(), lease_expires_at=None)


def mark_failed(session: Session, evaluation_id: str, *, code: str, message: str, owner: str | None = None) -> bool:
    return _transition(session, evaluation_id, {EvaluationStatus.queued, EvaluationStatus.running},
                       EvaluationStatus.failed, owner=owner, finished_at=now(), error_code=code,
                       error_message=message[:2000], lease_expires_at=None)


def reap(session: Session, *, max_attempts: int, requeue_after_seconds: float) -> list[str]:
    """Recover from workers that vanished: running evaluations whose lease expired go back to the queue (or
    fail once out of attempts), and queued ones nobody claimed for a while are handed out again. Returns the
    evaluation ids to send to the broker."""
    moment = time.time()
    _leases.hand_back_expired(session, moment=moment, max_attempts=max_attempts)
    return _leases.unclaimed(session, since=moment - requeue_after_seconds)
