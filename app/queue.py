"""The Celery application, configured from Settings, and the functions that send messages to the broker
(`enqueue_training`, `enqueue_evaluation`). Messages carry ids only, as JSON; the database row is the truth
about a job or an evaluation. Each goes to the queue of its base model and device class
(app/services/training_queues.py), so only a worker that serves both takes it.

Sends are fair across tenants: a tenant's rows beyond its in-flight count (ADAPTERY_MAX_IN_FLIGHT_PER_TENANT) are
held in the database and sent as its earlier ones end (`send_held_training`, `send_held_evaluations`); why this
design, and what it keeps of the reliability guarantees, is in app/services/leases.py's docstring."""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery
from sqlalchemy import select

from app.db.models import Evaluation, FineTuningJob
from app.db.session import session_scope
from app.services import evaluations, jobs
from app.services.training_queues import training_queue
from app.settings import get_settings

log = logging.getLogger("adaptery.queue")

TRAIN_TASK = "adaptery.train"
EVALUATE_TASK = "adaptery.evaluate"


def transport_options(broker_url: str, visibility_timeout: float) -> dict[str, object]:
    if broker_url.startswith(("redis://", "rediss://")):
        # Redis redelivers unacknowledged messages after the visibility timeout; training can run for
        # hours, and the job lease makes a redelivery harmless, so by default keep it above a job's length.
        return {"visibility_timeout": visibility_timeout,
                # kombu sweeps for overdue messages every interval × throttle seconds; keep that well
                # under a short timeout so redelivery happens when the timeout says.
                "unacked_restore_interval": max(1, min(10, int(visibility_timeout // 4))),
                "unacked_restore_throttle": 1 if visibility_timeout < 600 else 10}
    # kombu's SQLAlchemy transport hands its options to create_engine; it polls every second by default.
    return {}


def make_celery() -> Celery:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("adaptery", broker=settings.resolved_broker_url, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # The database row is the truth about a job; Celery's result backend is not used.
        task_ignore_result=True,
        # Long jobs: acknowledge after the task ends and take one message at a time, so a message is
        # never parked behind a running job in another worker's prefetch buffer.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        # A training process killed mid-task (OOM, kill -9) puts its message back; the job's lease decides
        # whether the redelivery may train (it may not while the lease is live; the reaper re-queues later).
        task_reject_on_worker_lost=True,
        # Every message names its queue (_send); a worker consumes the queues workers.process selects.
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(settings.resolved_broker_url,
                                                   settings.broker_visibility_timeout),
        # A pool process imports the training stack before it reports up (workers.process); on a slow CPU
        # that takes longer than Celery's 4 s default.
        worker_proc_alive_timeout=120,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


celery_app = make_celery()


def _send(task: str, object_id: str, queue: str) -> bool:
    try:
        celery_app.send_task(task, args=[object_id], queue=queue, retry=True,
                             retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as exc:  # kombu raises several connection error types
        log.warning("broker unreachable; %s stays queued for the reaper: %s", object_id, exc)
        return False
    return True


def enqueue_training(job_id: str) -> bool:
    """Hand a queued job to the training workers, unless its tenant already has its share in flight (then it is
    held, queued in the database, and sent when one of the tenant's jobs ends); False only when the broker cannot
    be reached.

    A job that was not handed over stays queued in the database, and every worker's reaper re-sends
    queued jobs nobody claimed (an outbox in all but name), so an outage delays work but never loses it.
    Duplicates are harmless: a worker must win the job's lease before it trains.
    """
    return _hand_over_job(job_id) != UNREACHABLE


def enqueue_evaluation(evaluation_id: str) -> bool:
    """Hand a queued evaluation to the workers, held as a job is past the tenant's in-flight count; False when the
    broker cannot be reached (it stays queued and the reaper re-sends it, as for jobs; a worker must win its lease
    before it runs)."""
    return _hand_over_evaluation(evaluation_id) != UNREACHABLE


SENT, HELD, UNREACHABLE = "sent", "held", "unreachable"


def _hand_over_job(job_id: str) -> str:
    with session_scope() as session:
        # Marked sent before the send, so that two processes never both send a held job; undone if it fails.
        if not jobs.reserve_send(session, job_id, limit=get_settings().max_in_flight_per_tenant):
            return HELD
        model, device_class = session.execute(select(FineTuningJob.model, FineTuningJob.device_class)
                                              .where(FineTuningJob.id == job_id)).one()
    if not _send(TRAIN_TASK, job_id, training_queue(model, device_class)):
        with session_scope() as session:
            jobs.unreserve(session, job_id)
        return UNREACHABLE
    return SENT


def _hand_over_evaluation(evaluation_id: str) -> str:
    with session_scope() as session:
        if not evaluations.reserve_send(session, evaluation_id, limit=get_settings().max_in_flight_per_tenant):
            return HELD
        base_model = session.scalar(select(Evaluation.base_model).where(Evaluation.id == evaluation_id))
    # Evaluations load models and run them as training does, so the workers serving the base model take them.
    if not _send(EVALUATE_TASK, evaluation_id, training_queue(str(base_model), None)):
        with session_scope() as session:
            evaluations.unreserve(session, evaluation_id)
        return UNREACHABLE
    return SENT


def send_held_training(job_id: str) -> list[str]:
    """One of the jobs in `job_id`'s lane (its tenant, base model and device class) ended or left the queue: send
    that lane's held jobs, oldest first, while the tenant's in-flight count allows. Returns the ids sent."""
    with session_scope() as session:
        waiting = jobs.held(session, job_id, limit=get_settings().max_in_flight_per_tenant)
    return _in_order(waiting, _hand_over_job)


def send_held_evaluations(evaluation_id: str) -> list[str]:
    """As send_held_training, for the evaluations of `evaluation_id`'s tenant and base model."""
    with session_scope() as session:
        waiting = evaluations.held(session, evaluation_id, limit=get_settings().max_in_flight_per_tenant)
    return _in_order(waiting, _hand_over_evaluation)


def _in_order(waiting: list[str], hand_over: Callable[[str], str]) -> list[str]:
    sent = []
    for row_id in waiting:
        outcome = hand_over(row_id)
        if outcome == UNREACHABLE:
            break  # the reaper sends them when the broker is back
        if outcome == SENT:
            sent.append(row_id)
        # HELD: the lane is full again, or another process took this one; the next may still be free to go
        # only in the second case, and trying it costs one guarded UPDATE.
    return sent
