"""The worker process around the jobs: heartbeat, reaper and webhook-delivery threads, and Celery's process signals (the
training stack imported in each pool process before it takes a job, the warm shutdown that hands jobs back).

Imported by workers.tasks, so Celery's `include=["workers.tasks"]` connects these handlers in every worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from app import logs
from app.db.fork_guard import database_work
from app.db.models import WorkerHeartbeat
from app.db.session import session_scope
from app.queue import enqueue_evaluation, enqueue_training
from app.services import evaluations, jobs, webhooks
from app.settings import get_settings

log = logging.getLogger("adaptery.worker")
HEARTBEAT_SECONDS = 5.0
_stop_threads = threading.Event()
# Created before the pool forks, so the training processes see the main process set it on shutdown.
shutting_down = multiprocessing.Event()


def _every(seconds: float, action: Callable[[], Any], name: str) -> None:
    def loop() -> None:
        while not _stop_threads.is_set():
            try:
                with database_work():  # never while this process forks a training process (app/db/fork_guard.py)
                    action()
            except Exception:  # a database or broker hiccup must not kill the thread
                log.exception("%s failed", name)
            _stop_threads.wait(seconds)

    threading.Thread(target=loop, daemon=True, name=name).start()


def reap_once() -> list[str]:
    settings = get_settings()
    with session_scope() as session:
        job_ids = jobs.reap(session, max_attempts=settings.max_attempts,
                            requeue_after_seconds=settings.requeue_after_seconds)
        evaluation_ids = evaluations.reap(session, max_attempts=settings.max_attempts,
                                          requeue_after_seconds=settings.requeue_after_seconds)
    for job_id in job_ids:
        enqueue_training(job_id)
    for evaluation_id in evaluation_ids:
        enqueue_evaluation(evaluation_id)
    return job_ids + evaluation_ids


@celeryd_after_setup.connect
def _consume_training_queues(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Consume the queues of this worker's device class and base models (settings), whatever -Q said."""
    from app.services.training_queues import worker_queues

    try:
        names = worker_queues(get_settings())
    except ValueError as exc:
        log.critical("%s", exc)
        raise SystemExit(str(exc)) from None
    queues = instance.app.amqp.queues
    queues.select(names)
    log.info("%s consumes %s", sender, ", ".join(names))


def _queue_refresher(consumer: Any) -> Callable[[], None]:
    """A base model registered over the admin API after this worker started gets its queues consumed here too (when
    this host has its weights), without a restart. Celery's consumer adds a queue in its own thread: call_soon."""
    from app.services.training_queues import worker_queues

    consumed = set(consumer.app.amqp.queues.consume_from or ())

    def refresh() -> None:
        try:
            wanted = worker_queues(get_settings())
        except ValueError as exc:  # a named model was removed: keep consuming what this worker has
            log.warning("base models not refreshed: %s", exc)
            return
        for name in wanted:
            if name not in consumed:
                consumed.add(name)
                consumer.call_soon(consumer.add_task_queue, name)
                log.info("now consumes %s (a base model registered since this worker started)", name)

    return refresh


@worker_init.connect
def _refuse_an_out_of_date_schema(**_: Any) -> None:
    from app.db.session import schema_problem

    problem = schema_problem()
    if problem:
        log.critical(problem)
        raise SystemExit(problem)


@worker_ready.connect
def _start_worker_threads(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}:{os.getpid()}"

    def beat() -> None:
        with session_scope() as session:
            session.merge(WorkerHeartbeat(hostname=hostname, last_seen=time.time(), pid=os.getpid()))

    _every(HEARTBEAT_SECONDS, beat, "adaptery-heartbeat")
    _every(get_settings().worker_queue_refresh_seconds, _queue_refresher(sender), "adaptery-queues")
    _every(get_settings().reaper_interval_seconds, reap_once, "adaptery-reaper")
    owner = f"{hostname}:webhooks"

    def deliver() -> None:
        # Outside the pool processes, so a slow receiver never holds up training; each round only claims and hands
        # deliveries to this process's delivery threads (ADAPTERY_WEBHOOK_DELIVERY_THREADS), so a slow receiver
        # never holds up the next delivery or this timer either.
        with session_scope() as session:
            webhooks.deliver_due(session, get_settings(), owner=owner)

    _every(get_settings().webhook_poll_seconds, deliver, "adaptery-webhooks")


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger: logging.Logger | None = None, **_: Any) -> None:
    """Celery's handlers in ADAPTERY_LOG_FORMAT, with the job, evaluation and tenant of the task (app/logs.py)."""
    if logger is None:
        return
    settings = get_settings()
    for handler in logger.handlers:
        logs.use_format(handler, settings.log_format)


@worker_process_init.connect
def _fresh_connections_after_fork(**_: Any) -> None:
    # The pool forks from the main process, whose heartbeat and reaper threads hold database connections;
    # a child must never share those sockets, so it starts its own pool.
    from app.db.session import get_engine

    get_engine().dispose(close=False)
    # Import the training stack now, before this process takes a job: a job's clock (and its time limit)
    # then starts with a warm process. Done after the fork, never in the parent, so no torch thread pool
    # crosses a fork. (worker_proc_alive_timeout in the Celery config leaves room for this.)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import workers.evaluator  # noqa: F401  (and what an evaluation needs)
    import workers.runner  # noqa: F401  (the training loop and everything a job needs)


@worker_shutting_down.connect
def _shutdown_requested(**_: Any) -> None:
    shutting_down.set()  # running jobs checkpoint and hand themselves back


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    _stop_threads.set()
