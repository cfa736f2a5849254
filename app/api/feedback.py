"""/v1/feedback: judgements of answers (which of two is better, thumbs up / down) appended to preference datasets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import IdempotencyKey, SessionDep, SettingsDep, TenantDep
from app.db.models import File
from app.schemas.common import ListResponse, listed
from app.schemas.errors import errors
from app.schemas.feedback import FeedbackAppend, FeedbackDatasetObject
from app.services import feedback, idempotency

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])


@router.post("", response_model=FeedbackDatasetObject, responses=errors(400, 401, 409, 429))
def append_feedback(body: FeedbackAppend, session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                    idempotency_key: IdempotencyKey = None) -> Any:
    # A client that retries after a timeout, or a double click, sends one Idempotency-Key: its lines land once.
    def create() -> dict[str, Any]:
        lines = [line.model_dump() for line in body.lines]
        dataset = feedback.append(session, tenant_id=tenant, settings=settings, name=body.dataset, lines=lines)
        return feedback.dataset_object(dataset, session.get(File, dataset.file_id))

    return idempotency.run_once(session, tenant_id=tenant, key=idempotency_key, create=create,
                                request_hash=idempotency.body_hash("feedback", body.model_dump()))


@router.get("", response_model=ListResponse[FeedbackDatasetObject], responses=errors(401, 429))
def list_feedback_datasets(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return listed([feedback.dataset_object(d, session.get(File, d.file_id))
                   for d in feedback.list_datasets(session, tenant_id=tenant)])
