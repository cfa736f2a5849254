"""The Celery tasks: train(job_id) claims the job by lease → runs it (workers.runner.JobRunner) → records a failure;
evaluate(evaluation_id) does the same for an evaluation (workers.evaluator). When either ends, its tenant's next
held job or evaluation is sent (fair queues: app/services/leases.py).

Celery imports this module in every worker (`include=["workers.tasks"]`); importing workers.process with it
connects the worker's heartbeat and reaper threads and its process signals.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
import uuid
from typing import Any

from sqlalchemy import select

from app import logs
from app.db.models import FineTuningJob
from app.db.session import session_scope
from app.queue import EVALUATE_TASK, TRAIN_TASK, celery_app, send_held_evaluations, send_held_training
from app.services import evaluations, jobs
from app.settings import get_settings
from workers import process  # noqa: F401  (connects the worker's threads and signal handlers)
from workers.lease import Lease

log = logging.getLogger("adaptery.worker")


@celery_app.task(name=TRAIN_TASK, bind=True, acks_late=True)
def train(self: Any, job_id: str) -> str:
    with session_scope() as session:
        tenant = session.scalar(select(FineTuningJob.tenant_id).where(FineTuningJob.id == job_id))
    with logs.bound(job_id=job_id, tenant=tenant):
        log.info("job %s: taken", job_id)
        outcome = _train(job_id, worker=self.request.hostname,
                         queue=(self.request.delivery_info or {}).get("routing_key"))
        log.info("job %s: %s", job_id, outcome)
        _send_held(send_held_training, job_id)
        return outcome


def _train(job_id: str, *, worker: str | None, queue: str | None) -> str:
    settings = get_settings()
    claimed_at = time.perf_counter()
    owner = _owner()
    with session_scope() as session:
        attempt = jobs.claim(session, job_id, owner=owner, lease_seconds=settings.lease_seconds,
                             max_attempts=settings.max_attempts)
        if attempt is None:
            job = session.get(FineTuningJob, job_id)
            log.info("job %s not claimed (status %s); skipping", job_id, job.status if job else "missing")
            return "skipped"
        jobs.add_event(session, job_id, "Fine-tuning job started." if attempt == 1
                       else f"Fine-tuning job started again (attempt {attempt} of {settings.max_attempts}).",
                       data={"worker": worker, "queue": queue})
    with Lease(job_id, owner, settings.lease_seconds) as lease:
        try:
            # Imported in the pool process that runs the job (worker_process_init already did): the runner
            # imports torch, which the Celery parent must never load before it forks. Inside the try, so a
            # broken training stack fails the job with its reason.
            from workers.runner import JobRunner

            return JobRunner(job_id, owner=owner, lease=lease, claimed_at=claimed_at).run()
        except Exception as exc:  # the job fails with a reason; the worker lives on
            log.exception("job %s failed", job_id)
            with session_scope() as session:
                if jobs.mark_failed(session, job_id, code=getattr(exc, "code", "training_error"),
                                    message=f"{type(exc).__name__}: {exc}", param=getattr(exc, "param", None),
                                    owner=owner):
                    jobs.add_event(session, job_id, f"Fine-tuning job failed: {exc}", level="error",
                                   data={"traceback": traceback.format_exc(limit=5)[-2000:]})
            return "failed"


@celery_app.task(name=EVALUATE_TASK, bind=True, acks_late=True)
def evaluate(self: Any, evaluation_id: str) -> str:
    with logs.bound(evaluation_id=evaluation_id):
        log.info("evaluation %s: taken", evaluation_id)
        outcome = _evaluate(evaluation_id)
        log.info("evaluation %s: %s", evaluation_id, outcome)
        _send_held(send_held_evaluations, evaluation_id)
        return outcome


def _send_held(send: Any, row_id: str) -> None:
    """The row ended (or was skipped): its tenant's next held row may go now (app/services/leases.py, fair queues).
    A failure here only delays that row until the next reaper tick, so it never fails the task."""
    try:
        send(row_id)
    except Exception:
        log.exception("handing over %s's held successors failed; the reaper will", row_id)


def _evaluate(evaluation_id: str) -> str:
    settings = get_settings()
    owner = _owner()
    with session_scope() as session:
        if evaluations.claim(session, evaluation_id, owner=owner, lease_seconds=settings.lease_seconds,
                             max_attempts=settings.max_attempts) is None:
            log.info("evaluation %s not claimed; skipping", evaluation_id)
            return "skipped"
    with Lease(evaluation_id, owner, settings.lease_seconds, renew=evaluations.renew_lease) as lease:
        try:
            # Imported here for the same reason as JobRunner above: torch only ever in the pool process.
            from workers.evaluator import run

            return run(evaluation_id, owner=owner, lease=lease)
        except Exception as exc:  # the evaluation fails with a reason; the worker lives on
            log.exception("evaluation %s failed", evaluation_id)
            code = getattr(exc, "code", None)  # the evaluator's own refusals carry a code and a full message
            with session_scope() as session:
                if isinstance(code, str):
                    evaluations.mark_failed(session, evaluation_id, code=code, message=str(exc), owner=owner)
                else:
                    evaluations.mark_failed(session, evaluation_id, code="evaluation_error",
                                            message=f"{type(exc).__name__}: {exc}", owner=owner)
            return "failed"


def _owner() -> str:
    """Who holds a lease: this process, plus a random part so two attempts in one process differ."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
