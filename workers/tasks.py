"""Celery tasks. train(job_id): claim the job by lease → train (resuming from a checkpoint) → record.

Every worker process also runs two small threads: a heartbeat (for /ready) and a reaper that
re-queues jobs whose worker vanished and re-sends queued jobs nobody claimed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy import select

from app.db.models import Adapter, AdapterStatus, Checkpoint, FineTuningJob, JobStatus, WorkerHeartbeat
from app.db.session import session_scope
from app.queue import TRAIN_TASK, celery_app, enqueue_training
from app.services import jobs
from app.settings import get_settings

log = logging.getLogger("adaptery.worker")
HEARTBEAT_SECONDS = 5.0
_stop_threads = threading.Event()
# Created before the pool forks, so the training processes see the main process set it on shutdown.
_shutting_down = multiprocessing.Event()


# ------------------------------------------------------------------ worker-level threads


def _every(seconds: float, action: Any, name: str) -> None:
    def loop() -> None:
        while not _stop_threads.is_set():
            try:
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
    for job_id in job_ids:
        enqueue_training(job_id)
    return job_ids


@worker_ready.connect
def _start_worker_threads(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}:{os.getpid()}"

    def beat() -> None:
        with session_scope() as session:
            session.merge(WorkerHeartbeat(hostname=hostname, last_seen=time.time(), pid=os.getpid()))

    _every(HEARTBEAT_SECONDS, beat, "adaptery-heartbeat")
    _every(get_settings().reaper_interval_seconds, reap_once, "adaptery-reaper")


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

    import workers.training.loop  # noqa: F401


@worker_shutting_down.connect
def _shutdown_requested(**_: Any) -> None:
    _shutting_down.set()  # running jobs checkpoint and hand themselves back


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    _stop_threads.set()


# ------------------------------------------------------------------ fault injection (tests only)


@dataclass
class FaultInjector:
    """Test-only faults from ADAPTERY_FAULT_INJECTION ("step_delay=0.1,exit_at_step=7,...")."""

    step_delay: float = 0.0
    exit_at_step: int = 0
    exit_in_checkpoint_at_step: int = 0

    @classmethod
    def parse(cls, text: str) -> FaultInjector:
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            values[key] = float(value) if key == "step_delay" else int(value)
        return cls(**values)

    def after_step(self, step: int) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.exit_at_step and step >= self.exit_at_step:
            os._exit(137)  # like kill -9: no cleanup, no exception handlers

    def during_checkpoint(self, step: int) -> None:
        if self.exit_in_checkpoint_at_step and step == self.exit_in_checkpoint_at_step:
            os._exit(137)


# ------------------------------------------------------------------ the task


class Lease:
    """Keeps renewing a job's lease from a thread; `lost` is set when another worker has taken over."""

    def __init__(self, job_id: str, owner: str, seconds: float):
        self.job_id, self.owner, self.seconds = job_id, owner, seconds
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="adaptery-lease")

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._done.wait(self.seconds / 3):
            try:
                with session_scope() as session:
                    if not jobs.renew_lease(session, self.job_id, owner=self.owner, lease_seconds=self.seconds):
                        self.lost.set()
                        return
            except Exception:  # keep trying until the lease runs out; expiry is the real arbiter
                log.exception("lease renewal failed")


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
            return run_job(job_id, owner=owner, lease=lease, claimed_at=claimed_at)
        except Exception as exc:  # the job fails with a reason; the worker lives on
            log.exception("job %s failed", job_id)
            with session_scope() as session:
                if jobs.mark_failed(session, job_id, code=getattr(exc, "code", "training_error"),
                                    message=f"{type(exc).__name__}: {exc}", owner=owner):
                    jobs.add_event(session, job_id, f"Fine-tuning job failed: {exc}", level="error",
                                   data={"traceback": traceback.format_exc(limit=5)[-2000:]})
            return "failed"


def _adapter_row(job: FineTuningJob, name: str, adapter_id: str, size: int) -> Adapter:
    return Adapter(id=adapter_id, tenant_id=job.tenant_id, name=name, base_model=job.model,
                   method=job.method["type"], job_id=job.id, size_bytes=size, status=AdapterStatus.ready)


def run_job(job_id: str, *, owner: str, lease: Lease, claimed_at: float) -> str:
    import torch

    from adapters.data import encode_dataset, parse_jsonl
    from adapters.methods import METHODS
    from adapters.store import ArtifactStore
    from app.services import base_models
    from workers.training import checkpoints
    from workers.training.checkpoints import save_adapter
    from workers.training.loop import (
        Cancelled,
        HandBack,
        LeaseLost,
        Paused,
        TimeLimit,
        TrainingCallbacks,
        train,
    )

    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    fault = FaultInjector.parse(settings.fault_injection)
    store = ArtifactStore(settings.data_dir)
    with session_scope() as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        session.expunge(job)
    method_type = job.method["type"]
    method = METHODS[method_type]
    hp = job.method[method_type]["hyperparameters"]

    def event(text: str, **kwargs: Any) -> None:
        with session_scope() as session:
            jobs.add_event(session, job_id, text, **kwargs)

    # Start-up phases are events with their durations: a job whose time limit ran out before its first
    # step shows where the time went (the limit's clock starts when a worker claims the job).
    phase_started = time.perf_counter()

    def phase_done(phase: str, text: str, **data: Any) -> None:
        nonlocal phase_started
        seconds = round(time.perf_counter() - phase_started, 2)
        event(f"{text} in {seconds:.2f} s.", data={"phase": phase, "seconds": seconds, **data})
        phase_started = time.perf_counter()

    spec = base_models.resolve(settings, job.model)
    tokenizer = base_models.load_tokenizer(settings, spec)
    base = base_models.load_model(settings, spec)
    phase_done("load_base_model", f"Loaded base model {job.model}")
    limit = settings.max_examples_per_file
    train_examples = encode_dataset(tokenizer, parse_jsonl(store.read_file(job.training_file), max_examples=limit))
    valid_examples = (encode_dataset(tokenizer, parse_jsonl(store.read_file(job.validation_file),
                                                            max_examples=limit))
                      if job.validation_file else [])
    tokens = sum(len(e.input_ids) for e in train_examples + valid_examples)
    phase_done("tokenise", f"Tokenised {len(train_examples)} training"
               + (f" and {len(valid_examples)} validation" if job.validation_file else "")
               + f" examples ({tokens} tokens)", examples=len(train_examples) + len(valid_examples), tokens=tokens)
    final_name = jobs.fine_tuned_model_name(job.model, job.suffix, job.id)
    checkpoint_root = store.checkpoint_dir(job_id)
    resume = checkpoints.latest(checkpoint_root)
    if resume is not None:
        with session_scope() as session:
            jobs.add_event(session, job_id, f"Resuming from the checkpoint at step {resume.step}.",
                           data={"resumed_from_step": resume.step})

    def on_metrics(metrics: dict[str, Any]) -> None:
        text = f"Step {metrics['step']}/{metrics['total_steps']}: training loss={metrics['train_loss']:.4f}"
        if "valid_loss" in metrics:
            text += f", validation loss={metrics['valid_loss']:.4f}"
        event(text, type="metrics", data=metrics)

    def on_progress(step: int, total: int, epoch: float, eta: float | None) -> None:
        with session_scope() as session:
            jobs.record_progress(session, job_id, step=step, total_steps=total, epoch=epoch, eta_seconds=eta)

    def should_stop() -> Exception | None:
        if lease.lost.is_set():
            return LeaseLost()
        with session_scope() as session:
            cancel, pause = jobs.stop_requests(session, job_id)
        if cancel:
            return Cancelled()
        if pause:
            return Paused()
        if job.soft_time_limit is not None and time.time() - (job.started_at or time.time()) > job.soft_time_limit:
            return TimeLimit()
        if _shutting_down.is_set():
            return HandBack()
        return None

    def publish(source: Any, name: str) -> Adapter:
        """A servable adapter from a model (or a checkpoint folder), unless one of that name exists."""
        with session_scope() as session:
            existing = session.scalar(select(Adapter).where(Adapter.name == name))
            if existing is not None:
                session.expunge(existing)
                return existing
        staging = store.staging_dir()
        if hasattr(source, "save_pretrained"):
            save_adapter(source, staging, method)
        else:
            for item in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copyfile(source / item, staging / item)
        adapter_id = jobs.new_id("adapter")
        store.publish_adapter(staging, adapter_id)
        row = _adapter_row(job, name, adapter_id, store.adapter_size(adapter_id))
        with session_scope() as session:
            session.add(row)
        return row

    last_checkpoint: dict[str, Any] = {}

    def on_checkpoint(model: Any, optimizer: Any, scheduler: Any, position: Any, metrics: dict[str, Any],
                      epoch_end: bool) -> None:
        folder = checkpoints.save(checkpoint_root, model=model, method=method, optimizer=optimizer, scheduler=scheduler,
                                  step=position.step, epoch=position.epoch, batch=position.batch,
                                  trained_tokens=position.trained_tokens, metrics=metrics, fault=fault)
        last_checkpoint["step"] = position.step
        adapter = publish(folder, f"{final_name}:ckpt-step-{position.step}")
        with session_scope() as session:
            if not session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id,
                                                              Checkpoint.step_number == position.step)):
                jobs.add_checkpoint(session, job, adapter=adapter, step=position.step, metrics=metrics)
        event(f"Checkpoint saved at step {position.step}{' (end of epoch)' if epoch_end else ''}: {adapter.name}")

    def on_training_start() -> None:
        phase_done("prepare_training", f"Built the {method_type} adapter and its optimiser")
        seconds = round(time.perf_counter() - claimed_at, 2)
        event(f"Start-up took {seconds:.2f} s; training begins.", data={"phase": "start_up", "seconds": seconds})

    callbacks = TrainingCallbacks(on_metrics=on_metrics, on_progress=on_progress, should_stop=should_stop,
                                  on_checkpoint=on_checkpoint, on_message=lambda text: event(text, level="warn"),
                                  on_training_start=on_training_start)
    try:
        model, result = train(base_model=base, method=method, hyperparameters=hp, seed=job.seed,
                              train_examples=train_examples, valid_examples=valid_examples,
                              pad_id=tokenizer.pad_token_id, eval_every_steps=settings.eval_every_steps,
                              log_every_steps=settings.log_every_steps, callbacks=callbacks,
                              checkpoint_steps=settings.checkpoint_steps, resume=resume,
                              after_step=fault.after_step)
    except Cancelled:
        with session_scope() as session:
            if jobs.mark_cancelled(session, job_id, from_statuses={JobStatus.running}, owner=owner):
                jobs.add_event(session, job_id, "Fine-tuning job cancelled.")
        return "cancelled"
    except LeaseLost:
        log.warning("job %s: lease lost to another worker; stopping without writing", job_id)
        return "lease_lost"
    except Paused:
        with session_scope() as session:
            if jobs.mark_paused(session, job_id, owner=owner):
                jobs.add_event(session, job_id, f"Job paused at step {last_checkpoint.get('step', 0)}; resume it "
                                                "to continue from there.")
        return "paused"
    except TimeLimit:
        with session_scope() as session:
            if jobs.mark_failed(session, job_id, code="timeout", owner=owner,
                                message=f"the job reached its time limit of {job.soft_time_limit:.0f} s; the "
                                        f"checkpoint at step {last_checkpoint.get('step', 0)} was kept"):
                jobs.add_event(session, job_id, "Time limit reached; the job failed after saving a checkpoint.",
                               level="error")
        return "timeout"
    except HandBack:
        with session_scope() as session:
            if jobs.release(session, job_id, owner=owner):
                jobs.add_event(session, job_id, "Worker shutting down; the job goes back to the queue and will "
                                                f"resume from step {last_checkpoint.get('step', 0)}.")
        enqueue_training(job_id)  # if the broker is down, the reaper re-sends it
        return "handed_back"
    publish(model, final_name)
    with session_scope() as session:
        if jobs.mark_succeeded(session, job_id, fine_tuned_model=final_name, trained_tokens=result.trained_tokens,
                               owner=owner):
            jobs.add_event(session, job_id, f"New fine-tuned model created: {final_name}")
            jobs.add_event(session, job_id, "The job has successfully completed.")
    return "done"
