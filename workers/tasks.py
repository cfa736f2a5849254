"""The Celery task train(job_id): claim the job by lease → run it (workers.runner.JobRunner) → record a failure.

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

from app.db.models import FineTuningJob
from app.db.session import session_scope
from app.queue import TRAIN_TASK, celery_app
from app.services import jobs
from app.settings import get_settings
from workers import process  # noqa: F401  (connects the worker's threads and signal handlers)
from workers.lease import Lease

log = logging.getLogger("adaptery.worker")


@celery_app.task(name=TRAIN_TASK, bind=True, acks_late=True)
def train(self: Any, job_id: str) -> str:
    settings = get_settings()
    claimed_at = time.perf_counter()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        attempt = jobs.claim(session, job_id, owner=owner, lease_seconds=settings.lease_seconds,
                             max_attempts=settings.max_attempts)
        if attempt is None:
            job = session.get(FineTuningJob, job_id)
            log.info("job %s not claimed (status %s); skipping", job_id, job.status if job else "missing")
            return "skipped"
        jobs.add_event(session, job_id, "Fine-tuning job started." if attempt == 1
                       else f"Fine-tuning job started again (attempt {attempt} of {settings.max_attempts}).")
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
                                    message=f"{type(exc).__name__}: {exc}", owner=owner):
                    jobs.add_event(session, job_id, f"Fine-tuning job failed: {exc}", level="error",
                                   data={"traceback": traceback.format_exc(limit=5)[-2000:]})
            return "failed"
