"""/v1/feedback: judgements of answers (which of two is better, thumbs up / down) appended to preference datasets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.db.models import File
from app.schemas.common import ListResponse, listed
from app.schemas.errors import errors
from app.schemas.feedback import FeedbackAppend, FeedbackDatasetObject
from app.services import feedback

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])


@router.post("", response_model=FeedbackDatasetObject, responses=errors(400, 401, 409, 429))
def append_feedback(body: FeedbackAppend, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Any:
    lines = [line.model_dump() for line in body.lines]
    dataset = feedback.append(session, tenant_id=tenant, settings=settings, name=body.dataset, lines=lines)
    return feedback.dataset_object(dataset, session.get(File, dataset.file_id))


@router.get("", response_model=ListResponse[FeedbackDatasetObject], responses=errors(401, 429))
def list_feedback_datasets(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    return listed([feedback.dataset_object(d, session.get(File, d.file_id))
                   for d in feedback.list_datasets(session, tenant_id=tenant)])
