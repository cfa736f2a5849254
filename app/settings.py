"""Adaptery's one Settings object: every knob comes from the environment (prefix ADAPTERY_).

Each field's description is its documentation: docs/reference/configuration.md is generated from them
(`adaptery reference`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "SmolLM2-135M-Instruct"
# Operator secrets shorter than this, or made of few distinct characters, are refused at start: such a key can be
# guessed, and it opens every tenant (the admin key) or the replicas' internal routes (the internal key).
MIN_SECRET_LENGTH = 16
MIN_SECRET_DISTINCT = 8
KNOWN_PLACEHOLDERS = ("change-me", "changeme", "change_me", "secret", "password", "adaptery", "admin", "internal")


class Settings(BaseSettings):
    # hide_input_in_errors: a refused secret is not echoed into the start-up error (and so the log).
    model_config = SettingsConfigDict(env_prefix="ADAPTERY_", extra="ignore", hide_input_in_errors=True)

    host: str = Field(default="127.0.0.1", description="The address `adaptery serve` listens on (0.0.0.0: every "
                                                       "interface).")
    admin_key: str = Field(default="", description="The key of the admin routes (/v1/admin), which create and revoke "
                                                   "tenants and keys. Empty: the admin routes answer 401.")
    bootstrap_key: str = Field(
        default="", description="A fixed API key of the local tenant, added to it at every start (tests, scripts). "
                                "Empty: a random key on first start, saved to <data dir>/bootstrap_key (and shown "
                                "once when `adaptery serve` runs at a terminal; never written to the log).")
    port: int = Field(default=8000, description="The port `adaptery serve` listens on.")

    @field_validator("admin_key", "bootstrap_key", "internal_key", "metrics_token")
    @classmethod
    def _strong_secret(cls, value: str, info: object) -> str:
        """An operator secret, when set, must not be guessable (the rule is in the error)."""
        name = "ADAPTERY_" + str(getattr(info, "field_name", "")).upper()
        if not value:
            return value
        stripped = value.lower().removeprefix("sk-ady-").removeprefix("sk-")
        for word in sorted(KNOWN_PLACEHOLDERS, key=len, reverse=True):
            stripped = stripped.replace(word, "")
        placeholder = stripped.strip("-_. 0123456789") == ""
        if len(value) < MIN_SECRET_LENGTH or len(set(value)) < MIN_SECRET_DISTINCT or placeholder:
            raise ValueError(f"{name} is too weak: use at least {MIN_SECRET_LENGTH} characters, {MIN_SECRET_DISTINCT} "
                             "of them different, and not a placeholder such as 'change-me' (e.g. "
                             "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        return value
    data_dir: Path = Field(
        default=Path("data"), description="This host's files: uploaded datasets, checkpoints, adapters, training "
                                          "curves, the converted default model, the bootstrap key, and the SQLite "
                                          "database and broker when no URL names others.")
    database_url: str = Field(default="", description="The database's SQLAlchemy URL, e.g. "
                                                      "postgresql+psycopg://host/adaptery. Empty: a SQLite file in the "
                                                      "data dir.")
    broker_url: str = Field(default="", description="The Celery broker's URL, e.g. redis://host:6379/0. Empty: the "
                                                    "embedded broker, kombu's SQLAlchemy transport on a SQLite file in "
                                                    "the data dir, no server needed.")

    default_base_model: str = Field(
        default=DEFAULT_BASE_MODEL, description="The base model used where a request names none (the methods "
                                                "catalogue, adapter imports, dataset tokenisation) and the one "
                                                "`adaptery prepare-model` prepares.")
    base_models: dict[str, str] = Field(
        default_factory=dict, description='Extra base models, {"id": "hub-id-or-local-path"}. The packaged default '
                                          'is always present.')
    model_cache_dir: Path | None = Field(
        default=None, description="Where the packaged default model is converted to; unset: <data dir>/base_models.")

    torch_threads: int = Field(default=1, description="Torch threads per process (training, evaluation, serving). On "
                                                      "2-core machines one per process is often faster than two.")
    device: str = Field(default="auto", description='Where models run: "auto" (the first CUDA GPU when there is '
                                                    'one, else the CPU), or "cpu", "cuda", "cuda:1", ...')
    training_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description='The dtype training and evaluations compute in: "auto" (bfloat16 where the '
                                    'hardware does it natively, on a CPU only when a probe measures it faster; '
                                    'float32 otherwise), "float32" or "bfloat16".')
    serving_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description='The dtype the serving engine holds base weights and adapters in: "auto" '
                                    '(bfloat16 on a CUDA GPU that has it, float16 on one that has not; on a CPU, '
                                    'bfloat16 where it is native and a probe measures it faster, as for training, '
                                    'else float32, where the engine matches PEFT to 1e-4), or one of the three.')
    base_model_quantization: dict[str, Literal["8bit", "4bit"]] = Field(
        default_factory=dict, description='Base models loaded with their projection weights quantised by '
                                          'bitsandbytes (CUDA only; the package is installed separately), '
                                          '{"model-id": "4bit"} (NF4, QLoRA) or "8bit". Adapters train and serve '
                                          'on top in the compute dtype.')
    training_memory_fraction: float = Field(
        default=0.8, gt=0, le=1,
        description="The memory a training step's activations may use, as this share of what the device has free "
                    "when the job starts. A step that needs more runs as several forward/backward passes whose "
                    "gradients add up (same result, more time).")
    training_memory_mb: int | None = Field(
        default=None, ge=1, description="The activation memory budget in MiB, instead of training_memory_fraction's "
                                        "share; unset: the share applies.")
    training_processes: int = Field(
        default=1, ge=1, le=64,
        description="Processes one job trains in, data parallel: with CUDA one per GPU (cuda:0 .. N-1); on a CPU, "
                    "gloo processes sharing its cores (the same path, for testing it; no faster on a CPU).")

    worker_device_class: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description='The device class a training worker declares, which picks the job queues it '
                                    'takes (app/services/training_queues.py). "auto": gpu when the host shows '
                                    'NVIDIA devices and device is not "cpu", else cpu.')
    worker_base_models: str = Field(
        default="", description="The base models a training worker trains, comma-separated. Empty: every "
                                "registered one.")
    worker_concurrency: int = Field(
        default=1, description="Training processes of the Celery worker that `adaptery serve` supervises (role all); "
                               "`adaptery worker` takes --concurrency instead.")

    artifact_store_url: str = Field(
        default="", description="Where artifacts live for every host. Empty: the data dir alone (one host, or a shared "
                                "volume); or an S3-compatible bucket, s3://bucket/prefix, with the data dir as each "
                                "host's working copy (adapters/store.py).")
    s3_endpoint_url: str | None = Field(
        default=None, description="The object store's endpoint for S3-compatible servers other than AWS (MinIO, "
                                  "Ceph, ...); unset for AWS.")

    adapter_cache_size: int = Field(
        default=16, description="Adapter slots per base model in a serving process: the adapters one batch can "
                                "serve at once. The least recently used adapter that is neither pinned nor serving "
                                "a request gives up its slot first.")
    adapter_cpu_cache_size: int = Field(
        default=128, description="Adapters whose weights stay in memory (slots included, so never fewer than "
                                 "adapter_cache_size): re-activating one is a copy, not a load.")
    adapter_cpu_cache_mb: int = Field(
        default=4096, ge=1, description="The most memory, in MiB, the weights of the adapters kept in memory may take "
                                        "together (per base model, slots included); the least recently used go first "
                                        "past it or past adapter_cpu_cache_size.")
    max_batch_size: int = Field(default=32, description="Sequences a serving process decodes together in one forward "
                                                        "pass, per base model.")
    max_pinned_adapters_per_tenant: int = Field(
        default=4, ge=0, description="Adapters one tenant may have pinned at once in a serving process (all base "
                                     "models together), so that no tenant can take the adapter slots every tenant "
                                     "shares; a pin beyond it is a 429. The admin's unpin (POST "
                                     "/v1/admin/adapters/{id}/unpin) frees any pin.")
    adapter_slot_wait_seconds: float = Field(
        default=30.0, gt=0, description="How long a request waits for an adapter slot when every slot is pinned or "
                                        "serving other requests; past it the request is a 503 with Retry-After.")
    max_concurrent_generations_per_tenant: int = Field(
        default=8, ge=1, description="Generation requests (chat and text completions, streamed or not) one tenant "
                                     "may have waiting or running at once in a serving process; one more is a 429 "
                                     "with Retry-After. Each row in the batch slows every other row's steps, so this "
                                     "is also what one tenant can cost another's latency (docs/serving.md).")
    generation_timeout_seconds: float = Field(
        default=600.0, gt=0, description="The longest a generation request may take, queueing included: past it the "
                                         "request is ended, its batch row freed, and it answers a 504 (a stream that "
                                         "has started ends with an error event).")
    preload_inference: bool = Field(
        default=False, description="Load the default base model into the serving engine at start-up rather than on "
                                   "the first request (roles all and inference).")

    role: Literal["all", "api", "inference"] = Field(
        default="all", description='What `adaptery serve` runs (its --role overrides this): "all" (API, serving '
                                   'engine and console: one machine; see inference_process), "api" (files, jobs, '
                                   'console; inference forwarded to the inference replicas, torch never imported) or '
                                   '"inference" (the serving engine behind its own OpenAI-compatible routes).')
    inference_process: bool = Field(
        default=True, description="Role all under `adaptery serve`: the serving engine runs in a process of its own "
                                  "(role inference on a free loopback port, supervised and restarted like the worker) "
                                  "and the served process forwards to it as role api, so that requests never wait "
                                  "for the decode loop's hold on the Python interpreter lock. false: API and engine "
                                  "in one process (one interpreter and tokenizer fewer; tenants' requests then slow "
                                  "each other more).")
    inference_urls: str = Field(
        default="", description="Role api: the inference replicas, a static comma-separated list of base URLs "
                                "(required).")
    internal_key: str = Field(
        default="", description="A secret shared by the API and the inference replicas: authenticates /internal/state "
                                "and forwarded requests (required by roles api and inference).")
    routing: Literal["affinity", "round_robin"] = Field(
        default="affinity", description='Role api: how a replica is chosen. "affinity": one that holds the adapter, '
                                        'else the adapter\'s owner by rendezvous hashing with bounded load; '
                                        '"round_robin": in turn, whatever the adapter (for comparison).')
    routing_load_factor: float = Field(
        default=1.25, ge=1.0, description="Bounded load: a replica with more than this × the mean requests in flight "
                                          "(+1) is passed over.")
    routing_poll_seconds: float = Field(default=1.0, gt=0, description="How often the API asks each replica for its "
                                                                       "state, in seconds.")

    max_upload_mb: int = Field(default=512, description="The largest file an upload (POST /v1/files) may send, in MiB.")
    max_adapter_mb: int = Field(default=2048, description="The largest imported adapter, its files unpacked, in MiB.")
    max_examples_per_file: int = Field(default=100_000, description="The most examples a dataset file may hold.")
    max_tokens_per_file: int = Field(default=50_000_000, description="The most tokens a dataset file may hold, all its "
                                                                     "examples together (chat template applied).")
    max_active_jobs_per_tenant: int = Field(default=20, description="Jobs a tenant may have queued, running or paused "
                                                                    "at once.")
    max_jobs_created_per_minute_per_tenant: int = Field(
        default=60, ge=0, description="Fine-tuning jobs a tenant may create in any 60 seconds (0: no limit). Every job "
                                      "is validated, stored, queued and, when it ends, announced to each of the "
                                      "tenant's webhook endpoints; creating and cancelling jobs in a loop would "
                                      "otherwise make a burst of writes per job for as long as a tenant likes.")
    max_in_flight_per_tenant: int = Field(
        default=2, ge=1, description="Jobs of one tenant handed to the workers of one training queue at once (sent to "
                                     "the broker or running); the tenant's other queued jobs wait in the database and "
                                     "are sent, oldest first, as these end, so one tenant's burst never runs before "
                                     "another tenant's first job. Evaluations are counted the same way, apart.")
    max_active_evaluations_per_tenant: int = Field(
        default=4, ge=1, description="Evaluations a tenant may have queued or running at once.")
    max_files_per_tenant: int = Field(default=1000, ge=1, description="Files a tenant may store (deleted ones do not "
                                                                      "count).")
    max_storage_mb_per_tenant: int = Field(
        default=10240, ge=1, description="The bytes a tenant's stored files may take, all together, in MiB.")
    max_aliases_per_tenant: int = Field(
        default=100, ge=1, description="Model aliases a tenant may have (each keeps the history of its last "
                                       "ALIAS_HISTORY changes).")
    max_adapters_per_tenant: int = Field(
        default=1000, ge=1, description="Adapters a tenant may have (fine-tuned models, their servable checkpoints "
                                        "and imports); at the limit, imports and new jobs are refused.")
    metrics_token: str = Field(
        default="", description="A token Prometheus sends to scrape /metrics (Authorization: Bearer <token>); it (or "
                                "the admin key) also shows /ready's error text. Empty: /metrics is open, as is usual "
                                "on an internal network.")
    failed_auth_per_minute: int = Field(
        default=60, ge=0, description="Requests with a wrong API key a client address may send per minute; past it, "
                                      "that address's requests are refused (429) for the rest of the minute before "
                                      "any lookup. Behind a reverse proxy, let uvicorn read the client address from "
                                      "its headers (--forwarded-allow-ips). 0 turns it off.")
    max_request_body_kb: int = Field(
        default=1024, ge=1, description="The largest request body of a route other than uploads and adapter imports "
                                        "(their own limits: ADAPTERY_MAX_UPLOAD_MB, ADAPTERY_MAX_ADAPTER_MB), in KiB; "
                                        "checked before any of it is read.")
    rate_limit_per_minute: int = Field(
        default=3000, description="Requests per minute per API key (counted in Redis when Redis is the broker, else "
                                  "in each API process); 0 turns it off.")
    max_example_tokens: int = Field(default=4096, description="The longest example (in tokens, chat template applied) "
                                                              "a dataset may contain.")
    max_seq_length_limit: int = Field(
        default=4096, description="The most a job's max_seq_length hyperparameter may be (its default is at most "
                                  "this), and the length evaluations cut examples to.")
    max_lora_rank: int = Field(
        default=64, description="The highest rank of a low-rank adapter: the rank hyperparameters a job may ask for "
                                "(r, init_r, target_r) and the rank an imported or served adapter may have.")
    max_choices_per_request: int = Field(
        default=8, ge=1, description="The most choices (n) one chat or completion request may ask for. Each choice is "
                                     "a row in the batch and counts as one generation against "
                                     "max_concurrent_generations_per_tenant.")
    max_tokens_limit: int = Field(
        default=4096, description="The most tokens a completion request may ask for (max_tokens); a request that "
                                  "names none gets at most this many too.")

    log_every_steps: int = Field(default=1, description="A metrics event every N optimiser steps (and at every "
                                                        "validation and the last step).")
    eval_every_steps: int = Field(
        default=0, description="Evaluation on the validation file every N optimiser steps. 0: about four "
                               "evaluations per job (ten with early stopping), plus one at the end.")
    validation_examples_per_eval: int = Field(
        default=256, description="Periodic validations score the first N validation examples; the end report scores "
                                 "all of them.")
    exact_match_examples: int = Field(
        default=200, description="The end report, and an evaluation, ask each model compared for greedy answers to "
                                 "this many validation prompts.")

    log_format: Literal["text", "json"] = Field(
        default="text", description='Log lines of the API and the workers: "text" or "json" (one object per line, '
                                    'with request id, tenant, job id).')
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="The level of the `adaptery serve` processes' log lines (API, inference "
                                    "replicas); Celery workers log at INFO.")

    webhook_allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts a webhook endpoint may name although they are loopback, "
                                          "link-local or this host (a JSON list).")
    webhook_max_attempts: int = Field(default=8, ge=1, le=50, description="Attempts a webhook delivery gets.")
    webhook_retry_seconds: float = Field(default=10.0, gt=0, description="The delay before a webhook delivery's first "
                                                                         "retry, in seconds, doubling after each.")
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, description="A webhook delivery attempt's timeout for "
                                                                           "each connect, write or read, in seconds.")
    webhook_attempt_deadline_seconds: float = Field(
        default=30.0, gt=0, le=300, description="The most one webhook delivery attempt may take in all (resolving, "
                                                "connecting, sending, waiting for the answer), in seconds: a reply "
                                                "drip-fed within each read's timeout still ends here.")
    webhook_poll_seconds: float = Field(default=1.0, gt=0, description="How often workers look for due webhook "
                                                                       "deliveries, in seconds.")
    webhook_delivery_threads: int = Field(
        default=8, ge=1, le=64, description="Webhook deliveries each worker process sends at once, on threads beside "
                                            "training, so a slow receiver never delays the next delivery.")
    webhook_in_flight_per_tenant: int = Field(
        default=2, ge=1, le=64, description="Webhook deliveries of one tenant in flight at once, over all workers: one "
                                            "tenant's slow endpoints cannot take every delivery thread.")
    webhook_max_endpoints_per_tenant: int = Field(
        default=20, ge=1, le=1000, description="Webhook endpoints a tenant may have; at the limit, creating another is "
                                               "refused (429) until one is deleted.")

    max_open_streams_per_tenant: int = Field(
        default=20, ge=1, description="Job event streams (GET …/events?stream=true) a tenant may hold open at once "
                                      "in one API process; past it, 429 too_many_open_streams.")
    event_stream_poll_seconds: float = Field(
        default=0.5, gt=0, le=10, description="How often a live event stream (GET …/events?stream=true) looks for "
                                              "new events, in seconds.")
    event_stream_ping_seconds: float = Field(
        default=15.0, gt=0, description="A keep-alive comment on every server-sent-event stream (job events, streamed "
                                        "completions) after this many seconds without an event, so proxies do not "
                                        "close a quiet stream (a long validation, a slow first token).")

    lease_seconds: float = Field(
        default=60.0, description="A worker owns a job (or evaluation) through a lease of this many seconds, "
                                  "renewed while it trains; a job whose lease expired is re-queued and resumes from "
                                  "its latest complete checkpoint.")
    max_attempts: int = Field(
        default=3, description="Attempts a job or evaluation gets: one whose lease expired after this many is failed "
                               "instead of re-queued.")
    checkpoint_steps: int = Field(
        default=100, description="A resumable checkpoint every N optimiser steps (and at each epoch end); 0: at epoch "
                                 "ends only.")
    worker_queue_refresh_seconds: float = Field(
        default=10.0, gt=0, description="How often a training worker looks for base models registered since it "
                                        "started (over the admin API) and starts consuming their queues.")
    reaper_interval_seconds: float = Field(
        default=10.0, description="How often each worker re-queues jobs and evaluations whose lease expired or that "
                                  "nobody claimed, and fails jobs past their hard time limit, in seconds.")
    broker_visibility_timeout: float = Field(
        default=12 * 3600, description="Redis broker only: a message not acknowledged within this many seconds is "
                                       "redelivered; the lease makes that harmless.")
    requeue_after_seconds: float = Field(
        default=120.0, description="A queued job (or evaluation) nobody claimed within this many seconds is handed to "
                                   "the broker again (duplicates are harmless).")
    max_time_limit_seconds: float = Field(
        default=7 * 24 * 3600, description="The cap on a job's time_limit_seconds (its soft limit); the hard limit "
                                           "adds a grace period to it.")
    default_time_limit_seconds: float = Field(
        default=24 * 3600, ge=0, description="The time limit (soft; the hard limit adds a grace period) of a job that "
                                             "gives no time_limit_seconds, at most max_time_limit_seconds; 0: such "
                                             "jobs run unbounded.")
    fault_injection: str = Field(
        default="", description='Test-only fault injection for the worker, e.g. "step_delay=0.1,exit_at_step=7". '
                                'Never set in production.')

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
