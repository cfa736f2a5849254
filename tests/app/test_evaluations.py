"""The evaluation state machine (app/services/evaluations.py) in-process, on SQLite and PostgreSQL: the lease
claim refuses a duplicate delivery, only the lease owner finishes, expiry lets the next attempt in, the attempts
cap, the hand-back, and the reaper. As in test_jobs.py, "later" is made by moving the row's own times into the past."""

from __future__ import annotations

import time

from sqlalchemy.orm import Session

from app.db.models import Evaluation, EvaluationStatus
from app.services import evaluations

LEASE = 30.0
MAX_ATTEMPTS = 2
REQUEUE_AFTER = 60.0


def new_evaluation(session: Session, **values: object) -> str:
    evaluation = Evaluation(id=f"eval-{time.time_ns()}", tenant_id="default", seq=time.time_ns(), file="file-x",
                            base_model="base", models=["base"], targets=[{"model": "base", "adapter_id": None}],
                            status=EvaluationStatus.queued.value, **values)
    session.add(evaluation)
    session.commit()
    return evaluation.id


def status(session: Session, evaluation_id: str) -> str:
    session.expire_all()
    row = session.get(Evaluation, evaluation_id)
    assert row is not None
    return row.status


def claim(session: Session, evaluation_id: str, owner: str) -> int | None:
    return evaluations.claim(session, evaluation_id, owner=owner, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS)


def expire_lease(session: Session, evaluation_id: str) -> None:
    row = session.get(Evaluation, evaluation_id)
    assert row is not None
    row.lease_expires_at = time.time() - 1
    session.commit()


def test_one_claim_wins_and_only_its_owner_finishes(session: Session) -> None:
    evaluation_id = new_evaluation(session)
    assert claim(session, evaluation_id, "worker-a") == 1
    assert claim(session, evaluation_id, "worker-b") is None  # a duplicate delivery while the lease lives
    assert evaluations.renew_lease(session, evaluation_id, owner="worker-a", lease_seconds=LEASE)
    assert not evaluations.renew_lease(session, evaluation_id, owner="worker-b", lease_seconds=LEASE)
    assert not evaluations.mark_succeeded(session, evaluation_id, results=[], owner="worker-b")
    assert evaluations.mark_succeeded(session, evaluation_id, results=[{"model": "base"}], owner="worker-a")
    assert status(session, evaluation_id) == EvaluationStatus.succeeded
    assert claim(session, evaluation_id, "worker-b") is None  # finished: never runs again
    assert not evaluations.mark_failed(session, evaluation_id, code="x", message="y")


def test_an_expired_lease_lets_the_next_attempt_in_and_the_old_owner_writes_nothing(session: Session) -> None:
    evaluation_id = new_evaluation(session)
    assert claim(session, evaluation_id, "worker-a") == 1
    expire_lease(session, evaluation_id)
    assert claim(session, evaluation_id, "worker-b") == 2
    assert not evaluations.renew_lease(session, evaluation_id, owner="worker-a", lease_seconds=LEASE)
    assert not evaluations.mark_failed(session, evaluation_id, code="evaluation_error", message="x",
                                       owner="worker-a")
    expire_lease(session, evaluation_id)
    assert claim(session, evaluation_id, "worker-c") is None  # out of attempts


def test_hand_back_and_the_reaper(session: Session) -> None:
    handed = new_evaluation(session)
    assert claim(session, handed, "worker-a") == 1
    assert not evaluations.release(session, handed, owner="worker-b")
    assert evaluations.release(session, handed, owner="worker-a")
    assert status(session, handed) == EvaluationStatus.queued

    sent = new_evaluation(session, enqueued_at=time.time())
    orphaned = new_evaluation(session)
    assert claim(session, orphaned, "worker-a") == 1
    exhausted = new_evaluation(session, attempts=MAX_ATTEMPTS - 1)
    assert claim(session, exhausted, "worker-a") == MAX_ATTEMPTS
    for evaluation_id in (orphaned, exhausted):
        expire_lease(session, evaluation_id)
    resend = evaluations.reap(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=REQUEUE_AFTER)
    # Never sent (the hand-back clears enqueued_at) and the orphan: sent again; recently sent: left alone.
    assert set(resend) == {handed, orphaned}
    assert status(session, orphaned) == EvaluationStatus.queued
    failed = session.get(Evaluation, exhausted)
    assert failed is not None and (failed.status, failed.error_code) == (EvaluationStatus.failed, "worker_lost")
    assert sent not in evaluations.reap(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=REQUEUE_AFTER)
    assert sent in evaluations.reap(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=0)
