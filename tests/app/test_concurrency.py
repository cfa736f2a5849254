"""Races between processes on one database, on SQLite and on PostgreSQL: the claims of jobs, evaluations and
webhook deliveries, a worker finishing a job while the API cancels it, and a reaper reading a lease its holder
renews a moment later. Every guarded transition must have exactly one winner.

The racers are separate processes (spawned, each with its own engine and connections), released together by
a barrier, each going through the rows in its own order so that they collide on most of them.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Evaluation, EvaluationStatus, FineTuningJob, JobStatus, WebhookDelivery, WebhookEndpoint
from app.services import evaluations, jobs, webhooks
from app.services.ids import new_id

# End-to-end tier: the racers are separate processes.
pytestmark = pytest.mark.e2e

RACERS = 4
ROWS = 24
LEASE = 30.0


def _race(url: str, action: str, owner: str, row_ids: list[str], barrier: Any, results: Any) -> None:
    """One racer (runs in its own process): `action` on every row, in an order of its own; reports the rows it won."""
    from app.db import session as db_session

    engine = db_session.make_engine(url)
    order = list(row_ids)
    random.Random(owner).shuffle(order)
    won: list[str] = []
    try:
        with sessionmaker(bind=engine, expire_on_commit=False)() as db:
            db.execute(select(1))  # connected before the start, so connecting is not part of the race
            barrier.wait(timeout=60)
            for row_id in order:
                if action == "claim_job":
                    ok = jobs.claim(db, row_id, owner=owner, lease_seconds=LEASE, max_attempts=3) is not None
                elif action == "claim_evaluation":
                    ok = evaluations.claim(db, row_id, owner=owner, lease_seconds=LEASE, max_attempts=3) is not None
                elif action == "claim_delivery":
                    ok = webhooks.claim_delivery(db, row_id, owner)
                elif action == "succeed":  # the worker holding the lease finishes the job
                    ok = jobs.mark_succeeded(db, row_id, fine_tuned_model=f"ft:{row_id}", trained_tokens=1,
                                             owner="holder")
                elif action == "cancel":  # the API cancels it
                    ok = jobs.mark_cancelled(db, row_id, from_statuses={JobStatus.running})
                else:
                    raise ValueError(action)
                if ok:
                    won.append(row_id)
        results.put((owner, won, None))
    except Exception as exc:  # reported to the test, which fails with it
        results.put((owner, won, f"{type(exc).__name__}: {exc}"))
    finally:
        engine.dispose()


def race(url: str, racers: dict[str, str], row_ids: list[str]) -> dict[str, list[str]]:
    """Run one process per racer ({owner: action}) at once; returns the rows each won."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(racers)), context.Queue()
    processes = [context.Process(target=_race, args=(url, action, owner, row_ids, barrier, results))
                 for owner, action in racers.items()]
    for process in processes:
        process.start()
    reports = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    errors = [f"{owner}: {error}" for owner, _, error in reports if error]
    assert not errors, errors
    return {owner: won for owner, won, _ in reports}


def database_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def queued_jobs(session: Session, count: int, status: JobStatus = JobStatus.queued, **values: Any) -> list[str]:
    ids = []
    for _ in range(count):
        job = FineTuningJob(id=new_id("ftjob"), tenant_id="default", seq=time.time_ns(), model="tiny",
                            status=status.value, training_file="file-x", seed=1,
                            method={"type": "lora", "lora": {"hyperparameters": {}}}, **values)
        session.add(job)
        ids.append(job.id)
    session.commit()
    return ids


def assert_one_winner_each(won: dict[str, list[str]], row_ids: list[str]) -> Counter[str]:
    wins = Counter(row_id for rows in won.values() for row_id in rows)
    assert sorted(wins) == sorted(row_ids), "every row was won by someone"
    assert set(wins.values()) == {1}, f"rows won more than once: {[r for r, n in wins.items() if n > 1]}"
    return wins


def test_racing_workers_claim_each_job_exactly_once(engine: Engine, session: Session) -> None:
    ids = queued_jobs(session, ROWS)
    won = race(database_url(engine), {f"worker-{i}": "claim_job" for i in range(RACERS)}, ids)
    assert_one_winner_each(won, ids)
    session.expire_all()
    for owner, rows in won.items():
        for job_id in rows:
            job = session.get(FineTuningJob, job_id)
            assert job is not None and (job.status, job.lease_owner, job.attempts) == ("running", owner, 1)


def test_racing_workers_take_over_each_expired_lease_exactly_once(engine: Engine, session: Session) -> None:
    """A lost worker's jobs (running, lease expired) are claimable again, and again by one worker only."""
    ids = queued_jobs(session, ROWS, status=JobStatus.running, lease_owner="lost", attempts=1,
                      lease_expires_at=time.time() - 5)
    won = race(database_url(engine), {f"worker-{i}": "claim_job" for i in range(RACERS)}, ids)
    assert_one_winner_each(won, ids)
    session.expire_all()
    assert {session.get(FineTuningJob, i).attempts for i in ids} == {2}  # type: ignore[union-attr]


def test_racing_workers_claim_each_evaluation_exactly_once(engine: Engine, session: Session) -> None:
    ids = []
    for n in range(ROWS):
        evaluation = Evaluation(id=f"eval-race-{n}", tenant_id="default", seq=time.time_ns(), file="file-x",
                                base_model="base", models=["base"], targets=[{"model": "base", "adapter_id": None}],
                                status=EvaluationStatus.queued.value)
        session.add(evaluation)
        ids.append(evaluation.id)
    session.commit()
    won = race(database_url(engine), {f"worker-{i}": "claim_evaluation" for i in range(RACERS)}, ids)
    assert_one_winner_each(won, ids)


def test_racing_workers_claim_each_webhook_delivery_exactly_once(engine: Engine, session: Session) -> None:
    session.add(WebhookEndpoint(id="we_race", tenant_id="default", url="http://127.0.0.1:9/hook", secret="whsec_x",
                                events=["fine_tuning.job.succeeded"]))
    session.commit()
    ids = [f"msg_race_{n}" for n in range(ROWS)]
    session.add_all(WebhookDelivery(id=i, endpoint_id="we_race", tenant_id="default",
                                    event_type="fine_tuning.job.succeeded", payload="{}",
                                    next_attempt_at=time.time() - 1) for i in ids)
    session.commit()
    won = race(database_url(engine), {f"worker-{i}": "claim_delivery" for i in range(RACERS)}, ids)
    assert_one_winner_each(won, ids)
    session.expire_all()
    assert {session.get(WebhookDelivery, i).attempts for i in ids} == {1}  # type: ignore[union-attr]


def test_a_job_finished_while_it_is_cancelled_ends_in_exactly_one_state(engine: Engine, session: Session) -> None:
    ids = queued_jobs(session, ROWS, status=JobStatus.running, lease_owner="holder", attempts=1,
                      lease_expires_at=time.time() + LEASE)
    won = race(database_url(engine), {"worker": "succeed", "api": "cancel"}, ids)
    assert_one_winner_each(won, ids)
    session.expire_all()
    for job_id in ids:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        expected = "succeeded" if job_id in won["worker"] else "cancelled"
        assert job.status == expected
        assert (job.fine_tuned_model is not None) == (expected == "succeeded")


def test_a_lease_renewed_after_the_reaper_read_it_expired_stays_with_its_holder(engine: Engine,
                                                                                 session: Session) -> None:
    """The reaper reads the expired leases, then changes each row; a holder that renews in between (a worker
    back from a long pause) keeps its job, as it would had it renewed a moment before the reaper read."""
    [job_id] = queued_jobs(session, 1, status=JobStatus.running, lease_owner="slow-worker", attempts=1,
                           lease_expires_at=time.time() - 1)
    holder = sessionmaker(bind=engine, expire_on_commit=False)()
    renewed: list[bool] = []

    def renew_after_the_read(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not renewed and statement.lstrip().upper().startswith("SELECT") and "lease_expires_at <" in statement:
            renewed.append(jobs.renew_lease(holder, job_id, owner="slow-worker", lease_seconds=LEASE))

    reaper = sessionmaker(bind=engine, expire_on_commit=False)()
    event.listen(engine, "after_cursor_execute", renew_after_the_read)
    try:
        jobs.reap(reaper, max_attempts=3, requeue_after_seconds=60)
    finally:
        event.remove(engine, "after_cursor_execute", renew_after_the_read)
        reaper.close()
        holder.close()
    assert renewed == [True], "the holder renewed between the reaper's read and its change"
    session.expire_all()
    job = session.get(FineTuningJob, job_id)
    assert job is not None and (job.status, job.lease_owner) == ("running", "slow-worker")
    assert job.lease_expires_at is not None and job.lease_expires_at > time.time()
