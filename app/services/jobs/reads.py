"""Reading a tenant's jobs: one by id (another tenant's is missing, as an unknown one is), or a page of them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import FineTuningJob
from app.errors import not_found
from app.services.ids import storable


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
