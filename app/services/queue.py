"""Handing jobs to the Celery workers (the message carries the job id only)."""

from __future__ import annotations


class BrokerUnavailable(RuntimeError):
    pass


def enqueue_training(job_id: str) -> None:
    from workers.celery_app import TRAIN_TASK, celery_app

    try:
        celery_app.send_task(TRAIN_TASK, args=[job_id], retry=True,
                             retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as exc:  # kombu raises several connection error types
        raise BrokerUnavailable(str(exc)) from exc
