"""/v1/evaluations: compare models (a base model, fine-tuned models, checkpoints) on an uploaded file."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic.json_schema import SkipJsonSchema

from app import queue
from app.api.deps import EvaluationDep, IdempotencyKey, SessionDep, SettingsDep, TenantDep
from app.schemas.common import PagedList, paged
from app.schemas.errors import errors
from app.schemas.evaluations import EvaluationCreate, EvaluationObject, evaluation_object
from app.services import evaluations, idempotency

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])
# A query parameter is sent or not, never null (SkipJsonSchema keeps null out of the document).
After = Annotated[str | SkipJsonSchema[None], Query(description="the last id of the previous page")]


@router.post("", response_model=EvaluationObject, responses=errors(400, 401, 404, 409, 429))
def create_evaluation(body: EvaluationCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                      idempotency_key: IdempotencyKey = None) -> Any:
    return idempotency.run_once(session, tenant_id=tenant, key=idempotency_key,
                                request_hash=idempotency.body_hash("evaluation", body.model_dump()),
                                create=lambda: _create(body, session, settings, tenant))


def _create(body: EvaluationCreate, session: Any, settings: Any, tenant: str) -> dict[str, Any]:
    evaluation = evaluations.create_evaluation(session, tenant_id=tenant, settings=settings, file=body.file,
                                               models=body.models, metadata=body.metadata,
                                               graders=[g.model_dump() for g in body.graders or []] or None)
    # If the broker is down it stays queued, and a worker's reaper hands it over when the broker is back.
    queue.enqueue_evaluation(evaluation.id)
    return evaluation_object(evaluation)


@router.get("", response_model=PagedList[EvaluationObject], responses=errors(400, 401, 404, 429))
def list_evaluations(session: SessionDep, tenant: TenantDep, after: After = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    rows, has_more = evaluations.list_evaluations(session, tenant_id=tenant, after=after, limit=limit)
    return paged([evaluation_object(r) for r in rows], has_more)


@router.get("/{evaluation_id}", response_model=EvaluationObject, responses=errors(401, 404, 429))
def get_evaluation(evaluation: EvaluationDep) -> dict[str, Any]:
    return evaluation_object(evaluation)
