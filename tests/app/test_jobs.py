"""The job state machine (app/services/jobs.py) in-process, on SQLite and on PostgreSQL: every allowed
transition, every refused one, leases and their expiry, the owner guard, the attempts cap, the hard time limit
and the reaper.

No Redis, no Celery, no HTTP: one migrated database per test (tests/app/conftest.py). "Later" is made by moving
the row's own times (lease_expires_at, enqueued_at, started_at) into the past, never by sleeping.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import NoResultFound
from sqlalchemy.orm import Session

from app.db.models import FineTuningJob, JobEvent, JobStatus
from app.services import jobs
from app.services.ids import new_id

LEASE = 30.0
MAX_ATTEMPTS = 3
REQUEUE_AFTER = 60.0
ALL = list(JobStatus)
TERMINAL = [JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled]


def make_job(session: Session, status: JobStatus = JobStatus.queued, **values: Any) -> str:
    job = FineTuningJob(id=new_id("ftjob"), tenant_id="default", seq=time.time_ns(), model="tiny",
                        status=status.value, training_file="file-x", seed=1,
                        method={"type": "lora", "lora": {"hyperparameters": {}}}, **values)
    session.add(job)
    session.commit()
    return job.id


def row(session: Session, job_id: str) -> FineTuningJob:
    """The row as the database has it now (not the session's cached copy)."""
    session.expire_all()
    job = session.get(FineTuningJob, job_id)
    assert job is not None
    return job


def events(session: Session, job_id: str) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def set_row(session: Session, job_id: str, **values: Any) -> None:
    job = row(session, job_id)
    for key, value in values.items():
        setattr(job, key, value)
    session.commit()


def running_job(session: Session, owner: str = "worker-a", **values: Any) -> str:
    """A job claimed by `owner` through the real claim (a live lease, attempt 1)."""
    job_id = make_job(session, **values)
    assert jobs.claim(session, job_id, owner=owner, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) == 1
    return job_id


def expire_lease(session: Session, job_id: str) -> None:
    set_row(session, job_id, lease_expires_at=time.time() - 1)


def refusal(call: Callable[[], object]) -> Exception:
    """The error a refused request raises. The service's error classes may change; the status and code
    the client sees must not, so tests look at those."""
    try:
        call()
    except Exception as exc:  # whatever its class, it carries the HTTP status and code
        return exc
    pytest.fail("the call was not refused")


def status_of(exc: Exception) -> int | None:
    """The HTTP status the app answers this error with: carried by the error, or given by the app's mapping."""
    from app import errors

    status = getattr(exc, "status", None)
    mapping = getattr(errors, "http_status", None)
    if status is None and mapping is not None:
        with contextlib.suppress(Exception):
            status = mapping(exc)
    return status


# ---------------------------------------------------------------- mark_queued / mark_enqueued


def test_validating_files_becomes_queued(session: Session) -> None:
    job_id = make_job(session, JobStatus.validating_files)
    assert jobs.mark_queued(session, job_id)
    assert row(session, job_id).status == JobStatus.queued


@pytest.mark.parametrize("status", [s for s in ALL if s != JobStatus.validating_files])
def test_mark_queued_from_any_other_status_is_refused(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status)
    assert not jobs.mark_queued(session, job_id)
    assert row(session, job_id).status == status


def test_mark_queued_of_a_missing_job_is_refused(session: Session) -> None:
    assert not jobs.mark_queued(session, "ftjob-missing")


def test_mark_enqueued_records_when_the_job_went_to_the_broker(session: Session) -> None:
    job_id = make_job(session)
    before = time.time()
    jobs.mark_enqueued(session, job_id)
    enqueued_at = row(session, job_id).enqueued_at
    assert enqueued_at is not None and before <= enqueued_at <= time.time()


# ---------------------------------------------------------------- claim and leases


def test_claim_of_a_queued_job_gives_a_lease(session: Session) -> None:
    job_id = make_job(session)
    before = time.time()
    assert jobs.claim(session, job_id, owner="worker-a", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) == 1
    job = row(session, job_id)
    assert job.status == JobStatus.running and job.lease_owner == "worker-a" and job.attempts == 1
    assert job.lease_expires_at is not None and before + LEASE <= job.lease_expires_at <= time.time() + LEASE
    assert job.started_at is not None


def test_a_second_claim_while_the_lease_is_live_is_refused(session: Session, other: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    lease = row(session, job_id).lease_expires_at
    # A duplicate delivery to another worker, and the same worker's own redelivery.
    assert jobs.claim(other, job_id, owner="worker-b", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) is None
    assert jobs.claim(session, job_id, owner="worker-a", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) is None
    job = row(session, job_id)
    assert job.lease_owner == "worker-a" and job.attempts == 1 and job.lease_expires_at == lease


def test_claim_succeeds_again_once_the_lease_has_expired(session: Session, other: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    started_at = row(session, job_id).started_at
    expire_lease(session, job_id)
    assert jobs.claim(other, job_id, owner="worker-b", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) == 2
    job = row(session, job_id)
    assert job.status == JobStatus.running and job.lease_owner == "worker-b" and job.attempts == 2
    assert job.lease_expires_at is not None and job.lease_expires_at > time.time()
    assert job.started_at == started_at  # the first start is kept (the hard time limit counts from it)


@pytest.mark.parametrize("status", [JobStatus.validating_files, JobStatus.paused, *TERMINAL])
def test_claim_of_a_job_that_is_not_queued_is_refused(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status)
    assert jobs.claim(session, job_id, owner="worker-a", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) is None
    job = row(session, job_id)
    assert job.status == status and job.lease_owner is None and job.attempts == 0


def test_claim_of_a_running_job_without_a_lease_is_refused(session: Session) -> None:
    job_id = make_job(session, JobStatus.running, lease_owner="worker-a", lease_expires_at=None, attempts=1)
    assert jobs.claim(session, job_id, owner="worker-b", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) is None
    assert row(session, job_id).lease_owner == "worker-a"


def test_claim_is_refused_once_attempts_reach_the_cap(session: Session) -> None:
    queued = make_job(session, attempts=MAX_ATTEMPTS)
    assert jobs.claim(session, queued, owner="worker-a", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) is None
    assert row(session, queued).status == JobStatus.queued
    lost = make_job(session, JobStatus.running, attempts=MAX_ATTEMPTS, lease_owner="worker-a",
                    lease_expires_at=time.time() - 1)
    assert jobs.claim(session, lost, owner="worker-b", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) is None
    assert row(session, lost).lease_owner == "worker-a"


def test_the_lease_holder_renews_its_lease(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    set_row(session, job_id, lease_expires_at=time.time() + 1)
    assert jobs.renew_lease(session, job_id, owner="worker-a", lease_seconds=LEASE)
    lease = row(session, job_id).lease_expires_at
    assert lease is not None and lease > time.time() + LEASE - 5


def test_renewing_an_expired_lease_nobody_took_keeps_the_job(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    expire_lease(session, job_id)
    assert jobs.renew_lease(session, job_id, owner="worker-a", lease_seconds=LEASE)
    assert jobs.claim(session, job_id, owner="worker-b", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) is None


def test_only_the_lease_holder_renews(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    lease = row(session, job_id).lease_expires_at
    assert not jobs.renew_lease(session, job_id, owner="worker-b", lease_seconds=LEASE * 10)
    assert row(session, job_id).lease_expires_at == lease


@pytest.mark.parametrize("status", [JobStatus.queued, JobStatus.paused, *TERMINAL])
def test_renewing_a_job_that_left_running_is_refused(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status, lease_owner="worker-a")
    assert not jobs.renew_lease(session, job_id, owner="worker-a", lease_seconds=LEASE)
    assert row(session, job_id).status == status


# ---------------------------------------------------------------- a worker's own transitions


def test_release_hands_the_job_back_to_the_queue(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    set_row(session, job_id, enqueued_at=time.time())
    assert jobs.release(session, job_id, owner="worker-a")
    job = row(session, job_id)
    assert job.status == JobStatus.queued and job.lease_owner is None and job.lease_expires_at is None
    assert job.enqueued_at is None and job.attempts == 1
    # Nobody holds it now: the next claim is attempt 2.
    assert jobs.claim(session, job_id, owner="worker-b", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) == 2


@pytest.mark.parametrize("status", [s for s in ALL if s != JobStatus.running])
def test_release_of_a_job_that_is_not_running_is_refused(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status, lease_owner="worker-a")
    assert not jobs.release(session, job_id, owner="worker-a")
    assert row(session, job_id).status == status


def test_mark_succeeded_records_the_result(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    assert jobs.mark_succeeded(session, job_id, fine_tuned_model="ft:tiny:x", trained_tokens=123, owner="worker-a")
    job = row(session, job_id)
    assert job.status == JobStatus.succeeded and job.fine_tuned_model == "ft:tiny:x" and job.trained_tokens == 123
    assert job.finished_at is not None and job.eta_seconds == 0.0 and job.lease_expires_at is None


def test_mark_succeeded_without_an_owner_is_not_guarded_by_the_lease(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    assert jobs.mark_succeeded(session, job_id, fine_tuned_model="ft:tiny:y", trained_tokens=1)
    assert row(session, job_id).status == JobStatus.succeeded


@pytest.mark.parametrize("status", [s for s in ALL if s != JobStatus.running])
def test_mark_succeeded_from_any_status_but_running_is_refused(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status)
    assert not jobs.mark_succeeded(session, job_id, fine_tuned_model="ft:tiny:z", trained_tokens=1)
    job = row(session, job_id)
    assert job.status == status and job.fine_tuned_model is None


@pytest.mark.parametrize("status", [JobStatus.validating_files, JobStatus.queued, JobStatus.running])
def test_mark_failed_from_an_unfinished_status(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status)
    assert jobs.mark_failed(session, job_id, code="invalid_file", message="x" * 5000, param="training_file")
    job = row(session, job_id)
    assert job.status == JobStatus.failed and job.error_code == "invalid_file" and job.error_param == "training_file"
    assert job.error_message == "x" * 2000 and job.finished_at is not None and job.lease_expires_at is None


@pytest.mark.parametrize("status", [JobStatus.paused, *TERMINAL])
def test_mark_failed_of_a_paused_or_finished_job_is_refused(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status)
    assert not jobs.mark_failed(session, job_id, code="boom", message="boom")
    job = row(session, job_id)
    assert job.status == status and job.error_code is None


def test_mark_cancelled_by_the_lease_holder(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    assert jobs.mark_cancelled(session, job_id, from_statuses={JobStatus.running}, owner="worker-a")
    job = row(session, job_id)
    assert job.status == JobStatus.cancelled and job.finished_at is not None and job.lease_expires_at is None


@pytest.mark.parametrize("status", ALL)
def test_mark_cancelled_only_from_the_statuses_given(session: Session, status: JobStatus) -> None:
    allowed = {JobStatus.validating_files, JobStatus.queued, JobStatus.paused}
    job_id = make_job(session, status)
    assert jobs.mark_cancelled(session, job_id, from_statuses=allowed) == (status in allowed)
    assert row(session, job_id).status == (JobStatus.cancelled if status in allowed else status)


def test_mark_paused_by_the_lease_holder(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    set_row(session, job_id, pause_requested=True)
    assert jobs.mark_paused(session, job_id, owner="worker-a")
    job = row(session, job_id)
    assert job.status == JobStatus.paused and not job.pause_requested
    assert job.lease_owner is None and job.lease_expires_at is None


@pytest.mark.parametrize("status", [s for s in ALL if s != JobStatus.running])
def test_mark_paused_of_a_job_that_is_not_running_is_refused(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status, lease_owner="worker-a")
    assert not jobs.mark_paused(session, job_id, owner="worker-a")
    assert row(session, job_id).status == status


# ---------------------------------------------------------------- the owner guard


FINISHES: dict[str, Callable[[Session, str, str], bool]] = {
    "succeed": lambda s, j, o: jobs.mark_succeeded(s, j, fine_tuned_model="ft:tiny:stale", trained_tokens=1, owner=o),
    "fail": lambda s, j, o: jobs.mark_failed(s, j, code="boom", message="boom", owner=o),
    "cancel": lambda s, j, o: jobs.mark_cancelled(s, j, from_statuses={JobStatus.running}, owner=o),
    "pause": lambda s, j, o: jobs.mark_paused(s, j, owner=o),
    "release": lambda s, j, o: jobs.release(s, j, owner=o),
    "renew": lambda s, j, o: jobs.renew_lease(s, j, owner=o, lease_seconds=LEASE),
}


@pytest.mark.parametrize("finish", sorted(FINISHES))
def test_a_worker_whose_lease_was_taken_cannot_touch_the_job(session: Session, other: Session, finish: str) -> None:
    job_id = running_job(session, owner="worker-a")
    expire_lease(session, job_id)  # worker-a stalled past its lease...
    assert jobs.claim(other, job_id, owner="worker-b", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) == 2
    lease = row(session, job_id).lease_expires_at
    # ...and comes back: nothing it does reaches the row worker-b now owns.
    assert not FINISHES[finish](session, job_id, "worker-a")
    after = row(session, job_id)
    assert (after.status, after.lease_owner, after.lease_expires_at, after.fine_tuned_model, after.error_code) == (
        JobStatus.running, "worker-b", lease, None, None)
    # The new owner still can.
    assert FINISHES[finish](other, job_id, "worker-b")


# ---------------------------------------------------------------- cancel, pause and resume requests


@pytest.mark.parametrize("status", [JobStatus.validating_files, JobStatus.queued, JobStatus.paused])
def test_cancel_of_a_job_that_has_not_started_is_immediate(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status)
    job = jobs.request_cancel(session, row(session, job_id))
    assert job.status == JobStatus.cancelled and not job.cancel_requested and job.finished_at is not None
    assert row(session, job_id).status == JobStatus.cancelled
    assert [e.message for e in events(session, job_id)] == ["Job cancelled before it started."]


def test_cancel_of_a_running_job_is_a_request_its_worker_sees(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    assert jobs.stop_requests(session, job_id) == (False, False)
    job = jobs.request_cancel(session, row(session, job_id))
    assert job.status == JobStatus.running and job.cancel_requested
    assert job.lease_owner == "worker-a"
    assert jobs.stop_requests(session, job_id) == (True, False)
    assert "Cancellation requested" in events(session, job_id)[-1].message
    # The worker then stops at a step boundary, as the lease holder.
    assert jobs.mark_cancelled(session, job_id, from_statuses={JobStatus.running}, owner="worker-a")


@pytest.mark.parametrize("status", TERMINAL)
def test_cancel_of_a_finished_job_is_a_conflict(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status)
    exc = refusal(lambda: jobs.request_cancel(session, row(session, job_id)))
    assert status_of(exc) == 409 and getattr(exc, "code", None) == "job_not_cancellable"
    job = row(session, job_id)
    assert job.status == status and not job.cancel_requested and events(session, job_id) == []


@pytest.mark.parametrize("status", [JobStatus.validating_files, JobStatus.queued])
def test_pause_of_a_job_that_has_not_started_is_immediate(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status)
    job = jobs.request_pause(session, row(session, job_id))
    assert job.status == JobStatus.paused and not job.pause_requested
    assert [e.message for e in events(session, job_id)] == ["Job paused before it started."]
    # A paused job is not handed out: the reaper does not re-send it and no worker can claim it.
    assert job_id not in jobs.reap(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=0)
    assert jobs.claim(session, job_id, owner="worker-a", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) is None


def test_pause_of_a_running_job_is_a_request_its_worker_sees(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    job = jobs.request_pause(session, row(session, job_id))
    assert job.status == JobStatus.running and job.pause_requested
    assert jobs.stop_requests(session, job_id) == (False, True)
    assert "Pause requested" in events(session, job_id)[-1].message
    assert jobs.mark_paused(session, job_id, owner="worker-a")
    assert jobs.stop_requests(session, job_id) == (False, False)


@pytest.mark.parametrize("status", [JobStatus.paused, *TERMINAL])
def test_pause_of_a_paused_or_finished_job_is_a_conflict(session: Session, status: JobStatus) -> None:
    job_id = make_job(session, status)
    exc = refusal(lambda: jobs.request_pause(session, row(session, job_id)))
    assert status_of(exc) == 409 and getattr(exc, "code", None) == "job_not_pausable"
    job = row(session, job_id)
    assert job.status == status and not job.pause_requested


def test_resume_queues_a_paused_job_for_a_fresh_claim(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    jobs.request_pause(session, row(session, job_id))
    assert jobs.mark_paused(session, job_id, owner="worker-a")
    set_row(session, job_id, enqueued_at=time.time())
    job = jobs.resume(session, row(session, job_id))
    assert job.status == JobStatus.queued and not job.pause_requested
    assert job.enqueued_at is None and job.lease_owner is None and job.lease_expires_at is None
    assert "Job resumed" in events(session, job_id)[-1].message
    # enqueued_at cleared: the reaper hands it to the broker if the caller's send is lost.
    assert job_id in jobs.reap(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=REQUEUE_AFTER)
    assert jobs.claim(session, job_id, owner="worker-b", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) == 2


@pytest.mark.parametrize("status", [s for s in ALL if s != JobStatus.paused])
def test_resume_of_a_job_that_is_not_paused_is_a_conflict(session: Session, status: JobStatus) -> None:
    values: dict[str, Any] = ({"lease_owner": "worker-a", "lease_expires_at": time.time() + LEASE, "attempts": 1}
                              if status == JobStatus.running else {})
    job_id = make_job(session, status, **values)
    exc = refusal(lambda: jobs.resume(session, row(session, job_id)))
    assert status_of(exc) == 409 and getattr(exc, "code", None) == "job_not_paused"
    job = row(session, job_id)
    assert job.status == status and job.lease_owner == values.get("lease_owner")


def test_stop_requests_of_a_missing_job_raise(session: Session) -> None:
    with pytest.raises(NoResultFound):
        jobs.stop_requests(session, "ftjob-missing")


def test_record_progress(session: Session) -> None:
    job_id = running_job(session)
    jobs.record_progress(session, job_id, step=7, total_steps=20, epoch=1.5, eta_seconds=12.5)
    job = row(session, job_id)
    assert (job.progress_step, job.progress_total_steps, job.progress_epoch, job.eta_seconds) == (7, 20, 1.5, 12.5)
    assert job.status == JobStatus.running  # progress is not a transition
    jobs.record_progress(session, job_id, step=8, total_steps=20, epoch=1.6, eta_seconds=None)
    assert row(session, job_id).eta_seconds is None


# ---------------------------------------------------------------- the reaper


def reap(session: Session, *, max_attempts: int = MAX_ATTEMPTS, requeue_after: float = REQUEUE_AFTER) -> list[str]:
    return jobs.reap(session, max_attempts=max_attempts, requeue_after_seconds=requeue_after)


def test_reap_leaves_a_live_lease_alone(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    assert job_id not in reap(session)
    job = row(session, job_id)
    assert job.status == JobStatus.running and job.lease_owner == "worker-a" and events(session, job_id) == []


def test_reap_requeues_a_job_whose_worker_was_lost(session: Session, other: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    expire_lease(session, job_id)
    assert job_id in reap(other)  # re-queued with enqueued_at cleared: handed to the broker at once
    job = row(session, job_id)
    assert job.status == JobStatus.queued and job.lease_owner is None and job.lease_expires_at is None
    assert job.enqueued_at is None and job.attempts == 1
    last = events(session, job_id)[-1]
    assert last.level == "warn" and "re-queued" in last.message
    # Another worker takes it; the lost one, back from the dead, cannot finish it.
    assert jobs.claim(other, job_id, owner="worker-b", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) == 2
    assert not jobs.mark_succeeded(session, job_id, fine_tuned_model="ft:tiny:stale", trained_tokens=1,
                                   owner="worker-a")
    assert jobs.mark_succeeded(other, job_id, fine_tuned_model="ft:tiny:ok", trained_tokens=1, owner="worker-b")


def test_reap_fails_the_job_once_attempts_reach_the_cap(session: Session) -> None:
    job_id = running_job(session, owner="worker-a")
    for attempt, owner in ((2, "worker-b"), (3, "worker-c")):
        expire_lease(session, job_id)
        assert job_id in reap(session)
        assert row(session, job_id).status == JobStatus.queued
        assert jobs.claim(session, job_id, owner=owner, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS) == attempt
    expire_lease(session, job_id)  # the third worker is lost too
    assert job_id not in reap(session)
    job = row(session, job_id)
    assert job.status == JobStatus.failed and job.error_code == "worker_lost" and job.attempts == MAX_ATTEMPTS
    assert job.error_message is not None and "3 times" in job.error_message
    assert job.finished_at is not None and job.lease_expires_at is None
    assert events(session, job_id)[-1].level == "error"
    # Failed is final: no further reap or claim changes it.
    assert job_id not in reap(session, requeue_after=0)
    assert jobs.claim(session, job_id, owner="worker-d", lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS + 1) is None
    assert row(session, job_id).status == JobStatus.failed


def test_reap_fails_a_job_past_its_hard_time_limit_even_with_a_live_lease(session: Session) -> None:
    job_id = running_job(session, owner="worker-a", soft_time_limit=60.0, hard_time_limit=120.0)
    set_row(session, job_id, started_at=int(time.time()) - 121)
    assert jobs.renew_lease(session, job_id, owner="worker-a", lease_seconds=LEASE)  # the worker is alive
    assert job_id not in reap(session)
    job = row(session, job_id)
    assert job.status == JobStatus.failed and job.error_code == "timeout" and job.lease_expires_at is None
    assert job.error_message is not None and "120 s" in job.error_message
    assert events(session, job_id)[-1].message == "Hard time limit reached; the job failed."
    assert not jobs.mark_succeeded(session, job_id, fine_tuned_model="ft:tiny:late", trained_tokens=1,
                                   owner="worker-a")


def test_reap_leaves_a_job_within_its_hard_time_limit(session: Session) -> None:
    job_id = running_job(session, owner="worker-a", soft_time_limit=60.0, hard_time_limit=120.0)
    set_row(session, job_id, started_at=int(time.time()) - 100)
    reap(session)
    assert row(session, job_id).status == JobStatus.running


def test_reap_returns_queued_jobs_nobody_claimed_in_time(session: Session) -> None:
    moment = time.time()
    never_sent = make_job(session, enqueued_at=None)
    stale = make_job(session, enqueued_at=moment - REQUEUE_AFTER - 5)
    fresh = make_job(session, enqueued_at=moment - REQUEUE_AFTER + 30)
    # Only queued jobs are handed out again, however old their enqueued_at.
    others = [make_job(session, status, enqueued_at=moment - 10 * REQUEUE_AFTER)
              for status in (JobStatus.validating_files, JobStatus.paused, *TERMINAL)]
    running = running_job(session)
    set_row(session, running, enqueued_at=moment - 10 * REQUEUE_AFTER)
    returned = reap(session)
    assert never_sent in returned and stale in returned
    assert fresh not in returned and running not in returned and not set(others) & set(returned)
    # Returning a job is not a transition: each stays queued (the caller sends it and marks it enqueued).
    assert {row(session, j).status for j in (never_sent, stale, fresh)} == {JobStatus.queued}
    jobs.mark_enqueued(session, stale)
    assert stale not in reap(session)
