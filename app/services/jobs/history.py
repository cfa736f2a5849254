"""What a job leaves behind as it runs: its events (the log a client reads and streams) and its checkpoints."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Adapter, Checkpoint, FineTuningJob, JobEvent, now
from app.errors import not_found
from app.services.ids import new_id, storable


def add_event(session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
    stage_event(session, job_id, message, level=level, type=type, data=data)
    session.commit()


def stage_event(session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",
                data: dict[str, Any] | None = None) -> None:
    """An event in the session's transaction, committed with whatever the caller commits next."""
    # The job row's lock, held until the insert commits: a job's events commit in id order, which the live
    # stream (event_stream.py) relies on to never skip one.
    tenant = session.scalar(select(FineTuningJob.tenant_id).where(FineTuningJob.id == job_id).with_for_update())
    session.add(JobEvent(public_id=new_id("ftevent"), job_id=job_id, tenant_id=tenant or "default",
                         message=message, level=level, type=type, data=data, created_at=now()))


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
