"""A job's state machine: every status change is one function here and one guarded UPDATE
(`... WHERE status IN (expected)`), so two processes racing on the same job cannot both win. Workers and the
API share these functions; the lease transitions themselves are app/services/leases.py's."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import TERMINAL_JOB_STATUSES, Checkpoint, FineTuningJob, JobStatus, now
from app.errors import Conflict
from app.services import webhooks
from app.services.jobs.history import add_event, stage_event
from app.services.leases import Leases

_leases = Leases(FineTuningJob, queued=JobStatus.queued, running=JobStatus.running, failed=JobStatus.failed,
                 noun="job", lane=("tenant_id", "model", "device_class"), on_transition=webhooks.record_job_outcome)
# The lease transitions under this module's names, which workers and tests call.
_transition = _leases.transition
mark_enqueued = _leases.mark_enqueued
# Fair hand-over to the broker (app/services/leases.py's docstring): reserve before a send, undo a failed one.
reserve_send = _leases.reserve_send
unreserve = _leases.unreserve
held = _leases.held
claim = _leases.claim
renew_lease = _leases.renew


def mark_queued(session: Session, job_id: str) -> bool:
    return _transition(session, job_id, {JobStatus.validating_files}, JobStatus.queued)


def release(session: Session, job_id: str, *, owner: str) -> bool:
    """running → queued, handing the job back (worker shutdown); it resumes from its checkpoint."""
    return _leases.release(session, job_id, owner=owner)


def mark_succeeded(session: Session, job_id: str, *, fine_tuned_model: str, trained_tokens: int,
                   owner: str | None = None, events: tuple[str, ...] = ()) -> bool:
    """running → succeeded; `events` commit in the same transaction, so whoever sees the status sees them too."""
    def stage(in_transaction: Session) -> None:
        for message in events:
            stage_event(in_transaction, job_id, message)

    return _transition(session, job_id, {JobStatus.running}, JobStatus.succeeded, owner=owner, finished_at=now(),
                       fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens, eta_seconds=0.0,
                       lease_expires_at=None, then=stage)


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
        _ask_the_running_job(session, job.id, cancel_requested=True)
        add_event(session, job.id, "Cancellation requested; training stops at the next step.")
    session.refresh(job)
    return job


def _ask_the_running_job(session: Session, job_id: str, **request: bool) -> None:
    """Set a request flag the worker reads between steps, only while the job is running."""
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id,
                                                FineTuningJob.status == JobStatus.running.value)
                    .values(**request))
    session.commit()


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
        _ask_the_running_job(session, job.id, pause_requested=True)
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
        # The loss, and the accuracy the job's objective has (token accuracy, or the pairs ranked right).
        checkpoint.metrics = {**checkpoint.metrics, **{key: result[key] for key in (
            "full_valid_loss", "full_valid_mean_token_accuracy", "full_valid_preference_accuracy") if key in result}}
    session.commit()
