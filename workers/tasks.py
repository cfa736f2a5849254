"""Celery tasks. train(job_id): claim the job → train → store the adapter → record the result."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from app.db.models import Adapter, AdapterStatus, FineTuningJob, WorkerHeartbeat
from app.db.session import session_scope
from app.services import jobs
from app.settings import get_settings
from workers.celery_app import TRAIN_TASK, celery_app

log = logging.getLogger("adaptery.worker")
HEARTBEAT_SECONDS = 5.0
_stop_heartbeat = threading.Event()


def _beat(hostname: str) -> None:
    while not _stop_heartbeat.is_set():
        try:
            with session_scope() as session:
                session.merge(WorkerHeartbeat(hostname=hostname, last_seen=time.time(), pid=os.getpid()))
        except Exception:  # a database hiccup must not kill the heartbeat thread
            log.exception("heartbeat failed")
        _stop_heartbeat.wait(HEARTBEAT_SECONDS)


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}:{os.getpid()}"
    threading.Thread(target=_beat, args=(hostname,), daemon=True, name="adaptery-heartbeat").start()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    _stop_heartbeat.set()


@celery_app.task(name=TRAIN_TASK, bind=True, acks_late=True)
def train(self: Any, job_id: str) -> str:
    with session_scope() as session:
        if not jobs.claim(session, job_id):
            job = session.get(FineTuningJob, job_id)
            log.info("job %s not claimed (status %s); skipping", job_id, job.status if job else "missing")
            return "skipped"
        jobs.add_event(session, job_id, "Fine-tuning job started.")
    try:
        run_job(job_id)
    except Exception as exc:  # the job fails with a reason; the worker lives on
        log.exception("job %s failed", job_id)
        with session_scope() as session:
            jobs.mark_failed(session, job_id, code=getattr(exc, "code", "training_error"),
                             message=f"{type(exc).__name__}: {exc}")
            jobs.add_event(session, job_id, f"Fine-tuning job failed: {exc}", level="error",
                           data={"traceback": traceback.format_exc(limit=5)[-2000:]})
        return "failed"
    return "done"


def _adapter_row(job: FineTuningJob, name: str, adapter_id: str, size: int) -> Adapter:
    return Adapter(id=adapter_id, tenant_id=job.tenant_id, name=name, base_model=job.model,
                   method=job.method["type"], job_id=job.id, size_bytes=size, status=AdapterStatus.ready)


def run_job(job_id: str) -> None:
    import torch

    from adapters import base_models
    from adapters.methods import METHODS
    from adapters.store import ArtifactStore
    from workers.training.data import encode_dataset, parse_jsonl
    from workers.training.loop import Cancelled, TrainingCallbacks, save_adapter, train

    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    store = ArtifactStore(settings.data_dir)
    with session_scope() as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        session.expunge(job)
    method_type = job.method["type"]
    method = METHODS[method_type]
    hp = job.method[method_type]["hyperparameters"]
    spec = base_models.resolve(settings, job.model)
    tokenizer = base_models.load_tokenizer(settings, spec)
    base = base_models.load_model(settings, spec)
    limit = settings.max_examples_per_file
    train_examples = encode_dataset(tokenizer, parse_jsonl(store.read_file(job.training_file), max_examples=limit))
    valid_examples = (encode_dataset(tokenizer, parse_jsonl(store.read_file(job.validation_file),
                                                            max_examples=limit))
                      if job.validation_file else [])
    final_name = jobs.fine_tuned_model_name(job.model, job.suffix, job.id)

    def on_metrics(metrics: dict[str, Any]) -> None:
        text = f"Step {metrics['step']}/{metrics['total_steps']}: training loss={metrics['train_loss']:.4f}"
        if "valid_loss" in metrics:
            text += f", validation loss={metrics['valid_loss']:.4f}"
        with session_scope() as session:
            jobs.add_event(session, job_id, text, type="metrics", data=metrics)

    def on_progress(step: int, total: int, epoch: float, eta: float | None) -> None:
        with session_scope() as session:
            jobs.record_progress(session, job_id, step=step, total_steps=total, epoch=epoch, eta_seconds=eta)

    def should_stop() -> bool:
        with session_scope() as session:
            return jobs.is_cancel_requested(session, job_id)

    def publish(model: Any, name: str) -> Adapter:
        staging = store.staging_dir()
        save_adapter(model, staging)
        adapter_id = jobs.new_id("adapter")
        store.publish_adapter(staging, adapter_id)
        row = _adapter_row(job, name, adapter_id, store.adapter_size(adapter_id))
        with session_scope() as session:
            session.add(row)
        return row

    def on_epoch_end(model: Any, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        adapter = publish(model, f"{final_name}:ckpt-step-{step}")
        with session_scope() as session:
            jobs.add_checkpoint(session, job, adapter=adapter, step=step, metrics={"step": step, **metrics})
            jobs.add_event(session, job_id, f"Checkpoint saved at step {step} (epoch {epoch}): {adapter.name}")

    def on_message(text: str) -> None:
        with session_scope() as session:
            jobs.add_event(session, job_id, text, level="warn")

    callbacks = TrainingCallbacks(on_metrics=on_metrics, on_progress=on_progress, should_stop=should_stop,
                                  on_epoch_end=on_epoch_end, on_message=on_message)
    try:
        model, result = train(base_model=base, method=method, hyperparameters=hp, seed=job.seed,
                              train_examples=train_examples, valid_examples=valid_examples,
                              pad_id=tokenizer.pad_token_id, eval_every_steps=settings.eval_every_steps,
                              log_every_steps=settings.log_every_steps, callbacks=callbacks)
    except Cancelled:
        with session_scope() as session:
            from app.db.models import JobStatus

            if jobs.mark_cancelled(session, job_id, from_statuses={JobStatus.running}):
                jobs.add_event(session, job_id, "Fine-tuning job cancelled.")
        return
    publish(model, final_name)
    with session_scope() as session:
        if jobs.mark_succeeded(session, job_id, fine_tuned_model=final_name, trained_tokens=result.trained_tokens):
            jobs.add_event(session, job_id, f"New fine-tuned model created: {final_name}")
            jobs.add_event(session, job_id, "The job has successfully completed.")
