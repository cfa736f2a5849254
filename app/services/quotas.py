"""Per-tenant quotas on what a tenant keeps and queues: stored files (count and bytes), adapters, active
evaluations, jobs created in the last 60 seconds. Each check runs before the work it guards and refuses with a
429 whose message names the limit and the setting that raises it. Quotas only ever refuse new work: nothing
already accepted is failed for them (a job that publishes a checkpoint past the adapter quota still succeeds).

The counts are read, then the work is done: two requests racing at the limit may both pass, overshooting by
one each. That is acceptable for a quota meant to stop a hostile tenant from taking everything, and it keeps
every check a single indexed read.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Adapter, AdapterStatus, Evaluation, EvaluationStatus, File, FineTuningJob, ModelAlias, now
from app.errors import LimitReached
from app.settings import Settings

MB = 1024 * 1024


def check_file(session: Session, *, tenant_id: str, settings: Settings, size: int) -> None:
    """Refuse a new stored file of `size` bytes past the tenant's file count or storage quota."""
    count, stored = session.execute(select(func.count(), func.coalesce(func.sum(File.bytes), 0)).where(
        File.tenant_id == tenant_id, File.deleted.is_(False))).one()
    if count >= settings.max_files_per_tenant:
        raise LimitReached(f"You have {count} files; at most {settings.max_files_per_tenant} are allowed "
                           "(ADAPTERY_MAX_FILES_PER_TENANT). Delete one first.", param="file",
                           code="too_many_files", retry_after=60)
    quota = settings.max_storage_mb_per_tenant * MB
    if stored + size > quota:
        raise LimitReached(f"This file ({size / MB:.1f} MiB) would take your stored files to "
                           f"{(stored + size) / MB:.1f} MiB; at most {settings.max_storage_mb_per_tenant} MiB are "
                           "allowed (ADAPTERY_MAX_STORAGE_MB_PER_TENANT). Delete files first.", param="file",
                           code="storage_quota_exceeded", retry_after=60)


def check_adapters(session: Session, *, tenant_id: str, settings: Settings, param: str | None = None) -> None:
    """Refuse work that makes an adapter (an import, a job) when the tenant is at its adapter quota."""
    count = session.scalar(select(func.count()).select_from(Adapter).where(
        Adapter.tenant_id == tenant_id, Adapter.status != AdapterStatus.deleted.value)) or 0
    if count >= settings.max_adapters_per_tenant:
        raise LimitReached(f"You have {count} adapters (fine-tuned models, checkpoints and imports); at most "
                           f"{settings.max_adapters_per_tenant} are allowed (ADAPTERY_MAX_ADAPTERS_PER_TENANT). "
                           "Delete one first.", param=param, code="too_many_adapters", retry_after=60)


def check_aliases(session: Session, *, tenant_id: str, settings: Settings) -> None:
    """Refuse a new alias when the tenant is at its alias quota (changing one it has is always allowed)."""
    count = session.scalar(select(func.count()).select_from(ModelAlias).where(ModelAlias.tenant_id == tenant_id)) or 0
    if count >= settings.max_aliases_per_tenant:
        raise LimitReached(f"You have {count} aliases; at most {settings.max_aliases_per_tenant} are allowed "
                           "(ADAPTERY_MAX_ALIASES_PER_TENANT). Delete one first.", param="alias",
                           code="too_many_aliases", retry_after=60)


def check_evaluations(session: Session, *, tenant_id: str, settings: Settings) -> None:
    """Refuse a new evaluation while the tenant has its quota of queued or running ones."""
    active = session.scalar(select(func.count()).select_from(Evaluation).where(
        Evaluation.tenant_id == tenant_id,
        Evaluation.status.in_([EvaluationStatus.queued.value, EvaluationStatus.running.value]))) or 0
    limit = settings.max_active_evaluations_per_tenant
    if active >= limit:
        raise LimitReached(f"You have {active} evaluations queued or running; at most {limit} are allowed at once "
                           "(ADAPTERY_MAX_ACTIVE_EVALUATIONS_PER_TENANT). Wait for one to finish.",
                           code="too_many_active_evaluations", retry_after=30)


def check_job_creations(session: Session, *, tenant_id: str, settings: Settings) -> None:
    """Refuse a job past the tenant's creations in the last 60 seconds (a sliding window over the jobs table, so
    every API replica sees the same count), with Retry-After until the oldest of them leaves the window."""
    limit = settings.max_jobs_created_per_minute_per_tenant
    if limit <= 0:
        return
    window_start = now() - 60
    recent = session.scalars(select(FineTuningJob.created_at).where(
        FineTuningJob.tenant_id == tenant_id, FineTuningJob.created_at > window_start)
        .order_by(FineTuningJob.created_at.desc()).limit(limit)).all()
    if len(recent) >= limit:
        retry = max(1, int(recent[-1] - window_start))
        raise LimitReached(f"You created {limit} fine-tuning jobs in the last 60 seconds; at most {limit} are allowed "
                           "(ADAPTERY_MAX_JOBS_CREATED_PER_MINUTE_PER_TENANT). Retry in "
                           f"{retry} s.", code="too_many_job_creations", retry_after=retry)
