"""The evaluation state machine (app/services/evaluations.py) in-process, on SQLite and PostgreSQL: the lease
claim refuses a duplicate delivery, only the lease owner finishes, expiry lets the next attempt in, the attempts
cap, the hand-back, and the reaper. As in test_jobs.py, "later" is made by moving the row's own times into the past."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Evaluation, EvaluationStatus
from app.services import evaluations

LEASE = 30.0
MAX_ATTEMPTS = 2
REQUEUE_AFTER = 60.0


@pytest.fixture()
def db(engine: Engine) -> Iterator[Session]:
    with sessionmaker(bind=engine, expire_on_commit=False)() as opened:
        yield opened


def new_evaluation(db: Session, **values: object) -> str:
    evaluation = Evaluation(id=f"eval-{time.time_ns()}", tenant_id="default", seq=time.time_ns(), file="file-x",
                            base_model="base", models=["base"], targets=[{"model": "base", "adapter_id": None}],
                            status=EvaluationStatus.queued.value, **values)
    db.add(evaluation)
    db.commit()
    return evaluation.id


def status(db: Session, evaluation_id: str) -> str:
    db.expire_all()
    row = db.get(Evaluation, evaluation_id)
    assert row is not None
    return row.status


def claim(db: Session, evaluation_id: str, owner: str) -> int | None:
    return evaluations.claim(db, evaluation_id, owner=owner, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS)


def expire_lease(db: Session, evaluation_id: str) -> None:
    row = db.get(Evaluation, evaluation_id)
    assert row is not None
    row.lease_expires_at = time.time() - 1
    db.commit()


def test_one_claim_wins_and_only_its_owner_finishes(db: Session) -> None:
    evaluation_id = new_evaluation(db)
    assert claim(db, evaluation_id, "worker-a") == 1
    assert claim(db, evaluation_id, "worker-b") is None  # a duplicate delivery while the lease lives
    assert evaluations.renew_lease(db, evaluation_id, owner="worker-a", lease_seconds=LEASE)
    assert not evaluations.renew_lease(db, evaluation_id, owner="worker-b", lease_seconds=LEASE)
    assert not evaluations.mark_succeeded(db, evaluation_id, results=[], owner="worker-b")
    assert evaluations.mark_succeeded(db, evaluation_id, results=[{"model": "base"}], owner="worker-a")
    assert status(db, evaluation_id) == EvaluationStatus.succeeded
    assert claim(db, evaluation_id, "worker-b") is None  # finished: never runs again
    assert not evaluations.mark_failed(db, evaluation_id, code="x", message="y")


def test_an_expired_lease_lets_the_next_attempt_in_and_the_old_owner_writes_nothing(db: Session) -> None:
    evaluation_id = new_evaluation(db)
    assert claim(db, evaluation_id, "worker-a") == 1
    expire_lease(db, evaluation_id)
    assert claim(db, evaluation_id, "worker-b") == 2
    assert not evaluations.renew_lease(db, evaluation_id, owner="worker-a", lease_seconds=LEASE)
    assert not evaluations.mark_failed(db, evaluation_id, code="evaluation_error", message="x",
                                       owner="worker-a")
    expire_lease(db, evaluation_id)
    assert claim(db, evaluation_id, "worker-c") is None  # out of attempts


def test_hand_back_and_the_reaper(db: Session) -> None:
    handed = new_evaluation(db)
    assert claim(db, handed, "worker-a") == 1
    assert not evaluations.release(db, handed, owner="worker-b")
    assert evaluations.release(db, handed, owner="worker-a")
    assert status(db, handed) == EvaluationStatus.queued

    sent = new_evaluation(db, enqueued_at=time.time())
    orphaned = new_evaluation(db)
    assert claim(db, orphaned, "worker-a") == 1
    exhausted = new_evaluation(db, attempts=MAX_ATTEMPTS - 1)
    assert claim(db, exhausted, "worker-a") == MAX_ATTEMPTS
    for evaluation_id in (orphaned, exhausted):
        expire_lease(db, evaluation_id)
    resend = evaluations.reap(db, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=REQUEUE_AFTER)
    # Never sent (the hand-back clears enqueued_at) and the orphan: sent again; recently sent: left alone.
    assert set(resend) == {handed, orphaned}
    assert status(db, orphaned) == EvaluationStatus.queued
    failed = db.get(Evaluation, exhausted)
    assert failed is not None and (failed.status, failed.error_code) == (EvaluationStatus.failed, "worker_lost")
    assert sent not in evaluations.reap(db, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=REQUEUE_AFTER)
    assert sent in evaluations.reap(db, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=0)
