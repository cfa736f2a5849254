"""SQLAlchemy models: the database rows are the truth about files, jobs and adapters.

Every row that belongs to someone carries tenant_id from the first migration, so multi-tenancy later
is a matter of passing the tenant, not of migrating data.
"""

from __future__ import annotations

import enum
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DEFAULT_TENANT = "default"


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class FileStatus(enum.StrEnum):
    uploaded = "uploaded"
    processed = "processed"
    error = "error"


class JobStatus(enum.StrEnum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    paused = "paused"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_JOB_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class AdapterStatus(enum.StrEnum):
    ready = "ready"
    deleted = "deleted"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKey(Base):
    """An API key: only its SHA-256 is stored (keys are 256-bit random, so a fast hash is enough)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, to tell keys apart in listings without revealing them.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    format: Mapped[str | None] = mapped_column(String(16), nullable=True)
    n_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Token-length summary (adapters.data.length_stats), written at upload; null for files uploaded before it.
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class FineTuningJob(Base):
    __tablename__ = "fine_tuning_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    # Monotonic sequence for stable cursor pagination (ids are random).
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    model: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    # {"type": ..., <type>: {"hyperparameters": {...resolved values...}}}
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_param: Mapped[str | None] = mapped_column(String(255), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Wall-clock limits for the training itself: at the soft one the job checkpoints and fails with
    # code "timeout"; past the hard one the reaper fails it whatever the worker is doing.
    soft_time_limit: Mapped[float | None] = mapped_column(Float, nullable=True)
    hard_time_limit: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Ownership by lease: the worker holding an unexpired lease is the only one training the job.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Last time the job was handed to the broker (the reaper re-sends queued jobs nobody claimed).
    enqueued_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_epoch: Mapped[float] = mapped_column(Float, default=0.0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # When progress (and eta_seconds) was last written: estimated_finish = progress_at + eta_seconds.
    progress_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # A fine-tuned model or checkpoint (an Adapter name) whose weights this job starts from.
    from_model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Graders for the end report on the validation file (app.schemas.graders shapes, as submitted); null: none.
    graders: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    # The kind of worker the job asked for ("cpu", "gpu"); null: any worker that serves its base model.
    device_class: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The end report: final metrics of the fine-tuned model and of the base model on the same examples.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class IdempotencyKey(Base):
    """The first response to a POST sent with an Idempotency-Key, replayed for repeats."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16), default="message")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The checkpoint is itself a servable adapter (an Adapter row with this name).
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(255))


class Adapter(Base):
    """A servable adapter: a job's final result, one of its checkpoints, or (later) an import."""

    __tablename__ = "adapters"
    # Names are each tenant's own: another tenant's name is neither taken nor an oracle of what exists. Another
    # tenant's public adapter is addressed by its id (app/services/inference.py, adapter_by_name).
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_adapters_tenant_id_name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_TENANT)
    # The model name its tenant passes as `model` (ft:... for the service's, a client-chosen one for an import).
    name: Mapped[str] = mapped_column(String(255))
    base_model: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16), default=AdapterStatus.ready)
    # Marked by the admin: every tenant may use it for inference (only its owner may manage it).
    public: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class WorkerHeartbeat(Base):
    """Each Celery worker writes here every few seconds; /ready uses it to know a worker is alive."""

    __tablename__ = "worker_heartbeats"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_seen: Mapped[float] = mapped_column(Float)
    pid: Mapped[int] = mapped_column(Integer)


class EvaluationStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class Evaluation(Base):
    """An on-demand evaluation: models on one base (the base itself, adapters, checkpoints) scored on one file
    by a worker. Owned by lease while it runs, as a job is, so a lost worker's evaluation runs again."""

    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    # Monotonic sequence for stable cursor pagination (ids are random).
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    file: Mapped[str] = mapped_column(String(64))
    base_model: Mapped[str] = mapped_column(String(255))
    # The models as the client named them, in its order, and what each resolved to when it was accepted:
    # [{"model": name, "adapter_id": id or None for the base model}].
    models: Mapped[list[Any]] = mapped_column(JSON)
    targets: Mapped[list[Any]] = mapped_column(JSON)
    eval_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    # {"graders": [the graders as submitted], "scorers": [{"model", "adapter_id"}, one per score_model grader's
    # model, resolved when it was accepted]}; null without graders.
    grading: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # One entry per model, in the order of `models`: {"model", "loss", "mean_token_accuracy", "tokens", ...}.
    results: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Last time it was handed to the broker (the reaper re-sends queued evaluations nobody claimed).
    enqueued_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class WebhookEndpoint(Base):
    """Where a tenant wants to hear about its jobs' outcomes; the secret signs every delivery (Standard
    Webhooks) and is shown to the tenant once, when the endpoint is created."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(String(128))
    events: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class WebhookDelivery(Base):
    """One event for one endpoint (an outbox row, written with the job's status change): pending until a
    worker delivers it (2xx), retried with backoff, failed after the last attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the event id: webhook-id, the same on retries
    endpoint_id: Mapped[str] = mapped_column(String(64), ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
                                             index=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)  # the exact body that is signed and sent
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class RegisteredBaseModel(Base):
    """A base model the operator registered over the API (POST /v1/admin/base_models), beside the packaged default
    and ADAPTERY_BASE_MODELS. What its checks read from the checkpoint is kept, so listing it reads no file."""

    __tablename__ = "base_models"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    # A folder on the hosts that serve and train it, or a hub id.
    source: Mapped[str] = mapped_column(Text)
    family: Mapped[str] = mapped_column(String(64))
    parameters: Mapped[int] = mapped_column(BigInteger)
    context_length: Mapped[int] = mapped_column(Integer)
    # The dtype the checkpoint stores its weights in (what the headers say).
    stored_dtype: Mapped[str] = mapped_column(String(16))
    # False: the tokenizer has none, and chat uses the stated default template (adapters/base_models.py).
    chat_template: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ModelAlias(Base):
    """A tenant's stable model name (e.g. `support-bot`) for one of its adapters at a time: what applications call,
    so that promoting another version or rolling back changes no client. Resolved per request, so requests in
    flight finish on the version they started with."""

    __tablename__ = "model_aliases"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)


class AliasPromotion(Base):
    """Each change of an alias, oldest first: what it pointed to before and after (the history a rollback reads)."""

    __tablename__ = "alias_promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    alias: Mapped[str] = mapped_column(String(255))
    adapter_id: Mapped[str] = mapped_column(String(64))
    previous_adapter_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(16))  # promote | rollback
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class FeedbackDataset(Base):
    """A tenant's dataset of preference or feedback lines collected one judgement at a time (the console's
    playground). Its lines live in an ordinary stored file; each append stores a new file holding every line so far
    and moves `file_id` to it, guarded by `version`, so a file a job has named never changes under it."""

    __tablename__ = "feedback_datasets"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    format: Mapped[str] = mapped_column(String(16))
    file_id: Mapped[str] = mapped_column(String(64))
    # The file before it: deleted on the next append (unless a job uses it), not at once, so that a job created
    # from the dataset's file while an append moves the dataset on still finds it.
    previous_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[int] = mapped_column(BigInteger)
