"""Adaptery's one Settings object: every knob comes from the environment (prefix ADAPTERY_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTERY_", extra="ignore")

    host: str = "127.0.0.1"
    # Creates and revokes tenants and keys (/v1/admin). Empty: the admin routes answer 401.
    admin_key: str = ""
    # The local tenant's key on first start; empty means a random one, printed and saved in the data dir.
    bootstrap_key: str = ""
    port: int = 8000
    data_dir: Path = Path("data")
    # Empty means a SQLite file in the data dir.
    database_url: str = ""
    # Empty means the embedded broker: kombu's SQLAlchemy transport on a SQLite file, no server needed.
    broker_url: str = ""

    default_base_model: str = DEFAULT_BASE_MODEL
    # Extra base models: {"id": "hub-id-or-local-path"}. The default is always present.
    base_models: dict[str, str] = Field(default_factory=dict)
    # Where the packaged default model is converted to; empty means <data dir>/base_models.
    model_cache_dir: Path | None = None

    # On 2-core machines one torch thread per process is often faster than two.
    torch_threads: int = 1
    # "auto": the first CUDA GPU when there is one, else the CPU. Or "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # The dtype training computes in: "auto" (bfloat16 where the hardware does it natively and a probe
    # measures it faster, float32 otherwise), "float32" or "bfloat16".
    training_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Memory a training step's activations may use; a step that needs more runs in several forward/backward
    # passes whose gradients add up (same result, more time). Default: this share of what the device has
    # free when the job starts; training_memory_mb, when set, is the budget instead.
    training_memory_fraction: float = Field(default=0.8, gt=0, le=1)
    training_memory_mb: int | None = Field(default=None, ge=1)
    # Processes one job trains in, data parallel: with CUDA one per GPU (cuda:0 .. N-1); on a CPU, gloo
    # processes sharing its cores (the same path, for testing it; no faster on a CPU).
    training_processes: int = Field(default=1, ge=1, le=64)
    # What a training worker declares and takes (app/services/training_queues.py): its device class ("auto":
    # gpu when the host shows NVIDIA devices) and the base models it trains, comma-separated (empty: all).
    worker_device_class: Literal["auto", "cpu", "gpu"] = "auto"
    worker_base_models: str = ""
    # Where artifacts live for every host: empty, the data dir alone (one host, or a shared volume); or an
    # S3-compatible bucket, s3://bucket/prefix, with the data dir as each host's working copy (adapters/store.py).
    artifact_store_url: str = ""
    # The object store's endpoint for S3-compatible servers other than AWS (MinIO, Ceph, ...).
    s3_endpoint_url: str | None = None
    # Adapter slots per base model in a serving process: adapters served in the same batch at once.
    # The least recently used adapter not serving a request gives up its slot first.
    adapter_cache_size: int = 16
    # Adapters whose weights stay in memory (slots included), so re-activating one is a copy, not a load.
    adapter_cpu_cache_size: int = 128
    # Sequences decoded together in one forward pass.
    max_batch_size: int = 32
    # Load the default base model into the API process at start-up rather than on first request.
    preload_inference: bool = False

    # What this process is (adaptery serve --role): "all" (API, serving engine and console in one process: one
    # machine), "api" (files, jobs, console; inference forwarded to the inference replicas, torch never
    # imported) or "inference" (the serving engine behind its own OpenAI-compatible routes).
    role: Literal["all", "api", "inference"] = "all"
    # Role api: the inference replicas, a static comma-separated list of base URLs.
    inference_urls: str = ""
    # Shared by the API and the inference replicas: authenticates /internal/state and forwarded requests.
    internal_key: str = ""
    # Role api: how a replica is chosen. "affinity": one that holds the adapter, else the adapter's owner by
    # rendezvous hashing with bounded load; "round_robin": in turn, whatever the adapter (for comparison).
    routing: Literal["affinity", "round_robin"] = "affinity"
    # Bounded load: a replica with more than this × the mean requests in flight (+1) is passed over.
    routing_load_factor: float = Field(default=1.25, ge=1.0)
    # How often the API asks each replica for its state.
    routing_poll_seconds: float = Field(default=1.0, gt=0)

    max_upload_mb: int = 512
    # An imported adapter's files, unpacked.
    max_adapter_mb: int = 2048
    max_examples_per_file: int = 100_000
    max_tokens_per_file: int = 50_000_000
    # Jobs a tenant may have queued, running or paused at once.
    max_active_jobs_per_tenant: int = 20
    # Requests per minute per API key (counted in Redis when Redis is the broker); 0 turns it off.
    rate_limit_per_minute: int = 3000
    # Longest example (in tokens, chat template applied) a dataset may contain.
    max_example_tokens: int = 4096
    max_seq_length_limit: int = 4096
    max_lora_rank: int = 64
    max_tokens_limit: int = 4096

    # Training cadence: a metrics event every N steps, evaluation on the validation file every N steps.
    log_every_steps: int = 1
    # Log lines of the API and the workers: "text" or "json" (one object per line, with request id, tenant,
    # job id), at this level.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Webhooks: hosts an endpoint may name although they are loopback/link-local/this host (JSON list), how many
    # attempts a delivery gets, the first retry's delay (doubling after each), each attempt's timeout, and how
    # often workers look for due deliveries.
    webhook_allowed_hosts: list[str] = []
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_retry_seconds: float = Field(default=10.0, gt=0)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_poll_seconds: float = Field(default=1.0, gt=0)
    # How often a live event stream (GET …/events?stream=true) looks for new events.
    event_stream_poll_seconds: float = Field(default=0.5, gt=0, le=10)
    # A keep-alive comment on every server-sent-event stream (job events, streamed completions) after this long
    # without an event, so proxies do not close a quiet stream (a long validation, a slow first token).
    event_stream_ping_seconds: float = Field(default=15.0, gt=0)
    eval_every_steps: int = 0  # 0: about four evaluations per job (ten with early stopping), plus one at the end
    # Periodic validations score the first N validation examples; the end report scores all of them.
    validation_examples_per_eval: int = 256
    # The end report asks the fine-tuned and the base model for greedy answers to this many validation prompts.
    exact_match_examples: int = 200
    worker_concurrency: int = 1

    # Reliability: a worker owns a job through a lease it renews while training; a job whose lease
    # expired is re-queued (up to max_attempts) and resumes from its latest complete checkpoint.
    lease_seconds: float = 60.0
    max_attempts: int = 3
    # A resumable checkpoint every N optimiser steps (and at each epoch end).
    checkpoint_steps: int = 100
    reaper_interval_seconds: float = 10.0
    # Redis redelivers a message not acknowledged within this long; the lease makes that harmless.
    broker_visibility_timeout: float = 12 * 3600
    # A queued job nobody claimed within this long is handed to the broker again (duplicates are harmless).
    requeue_after_seconds: float = 120.0
    # Cap on a job's time_limit_seconds (the soft limit); the hard limit adds a grace period to it.
    max_time_limit_seconds: float = 7 * 24 * 3600
    # Test-only fault injection for the worker, e.g. "step_delay=0.1,exit_at_step=7". Never set in production.
    fault_injection: str = ""

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'adaptery.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def uses_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("sqla+")


@lru_cache
def get_settings() -> Settings:
    return Settings()
