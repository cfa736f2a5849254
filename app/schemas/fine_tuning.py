"""Fine-tuning job requests and objects, in OpenAI's shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapters.methods import DEFAULT_METHOD, METHODS, accepted_names, method_named
from app.db.models import Checkpoint, FineTuningJob, JobEvent
from app.schemas.common import Metadata, Request
from app.schemas.graders import Graders
from app.services.training_queues import training_queue

SUFFIX_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$"
MAX_JOB_GRADERS = 4


def _hyperparameters_schema(name: str) -> dict[str, Any]:
    method = method_named(name)
    assert method is not None
    return method.hyperparameters.model_json_schema()


def _method_schema(schema: dict[str, Any]) -> None:
    """One shape per registered method name, so the document says exactly what the server accepts:
    {"type": <name>, <name>?: {"hyperparameters"?: {...}} | null}."""
    variants = []
    # OpenAI's 'dpo' takes the default method's hyperparameters (objective set to dpo; from_model's method with one).
    for name, method in [*((n, n) for n in accepted_names()), ("dpo", DEFAULT_METHOD)]:
        section = {"type": "object", "additionalProperties": False, "properties": {
            "hyperparameters": {"anyOf": [_hyperparameters_schema(method), {"type": "null"}]}}}
        variants.append({"type": "object", "title": name, "required": ["type"], "additionalProperties": False,
                         "properties": {"type": {"const": name}, name: {"anyOf": [section, {"type": "null"}]}}})
    description = schema.get("description")
    schema.clear()
    schema.update({"oneOf": variants, "description": description})


class MethodSpec(BaseModel):
    """The fine-tuning method and its hyperparameters: {"type": <method>, <method>: {"hyperparameters": {...}}}
    (the section named by type is optional). Every hyperparameter may be omitted or "auto"."""

    # The section's key is the method's name, so the model takes extra keys; _method_schema documents them.
    model_config = ConfigDict(extra="allow", json_schema_extra=_method_schema)

    type: str = Field(description=f"the fine-tuning method: {', '.join(accepted_names())} ('{DEFAULT_METHOD}' "
                                  "when no method is given), or dpo: preference tuning (the dpo objective) with "
                                  f"from_model's method or {DEFAULT_METHOD}")


def _job_create_schema(schema: dict[str, Any]) -> None:
    # Top-level hyperparameters (OpenAI's older shape) and a method are not given together.
    schema["not"] = {"required": ["method", "hyperparameters"], "properties": {
        "method": {"type": "object"}, "hyperparameters": {"type": "object", "minProperties": 1}}}
    schema["properties"]["hyperparameters"]["anyOf"][0] = METHODS[DEFAULT_METHOD].hyperparameters.model_json_schema()


class JobCreate(Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_job_create_schema)

    model: str = Field(min_length=1, max_length=255, description="a base model id (GET /v1/models)")
    training_file: str = Field(min_length=1, max_length=64,
                               description="the id of a processed file with purpose fine-tune")
    validation_file: str | None = Field(default=None, max_length=64,
                                        description="a processed file in the training file's format")
    suffix: str | None = Field(default=None, pattern=SUFFIX_PATTERN,
                               description="up to 40 characters: letters, digits, '.', '_' and '-'")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: Metadata = None
    method: MethodSpec | None = None
    # OpenAI's older top-level hyperparameters (n_epochs, batch_size, learning_rate_multiplier): the default method's.
    hyperparameters: dict[str, Any] | None = Field(
        default=None, description=f"OpenAI's older shape: hyperparameters of the default method ({DEFAULT_METHOD}); "
                                  "not together with method")
    integrations: list[Any] | None = Field(default=None, json_schema_extra={"maxItems": 0},
                                           description="not supported: empty or null")
    # Adaptery's own: start from the weights of a fine-tuned model or checkpoint of the same base model.
    from_model: str | None = Field(default=None, min_length=1, max_length=255,
                                   description="a fine-tuned model or checkpoint (ft:...) of the same base model to "
                                               "continue training; its method and shape are kept")
    # Adaptery's own: which kind of worker trains it (workers say which they are; see ADAPTERY_WORKER_DEVICE_CLASS).
    device_class: Literal["cpu", "gpu"] | None = Field(
        default=None, description="train only on a worker of this class; omitted: any worker serving the base model")
    # Adaptery's own: stop training after this many seconds (checkpoint, then fail with code "timeout").
    time_limit_seconds: float | None = Field(default=None, gt=0,
                                             description="at most the server's ADAPTERY_MAX_TIME_LIMIT_SECONDS")

    # Adaptery's own: graders (the shapes of POST /v1/evaluations') for the end report on the validation file.
    graders: Graders | None = Field(default=None, max_length=MAX_JOB_GRADERS, description=(
        f"up to {MAX_JOB_GRADERS} graders, as in POST /v1/evaluations, that grade the fine-tuned and the base "
        "model's answers on the validation_file in the job's end report; a score_model grader scores with the "
        "job's base model"))

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("integrations are not supported by this server")
        return value


class JobError(BaseModel):
    code: str | None
    message: str | None
    param: str | None


class Progress(BaseModel):
    step: int
    total_steps: int | None
    epoch: float
    eta_seconds: float | None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    status: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    error: JobError | None
    seed: int
    metadata: dict[str, str] | None
    progress: Progress
    user_provided_suffix: str | None = None
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    integrations: list[Any] = Field(default_factory=list)
    estimated_finish: int | None = Field(default=None, description="running jobs: when training should end "
                                                                   "(unix seconds), from the recent step times")
    from_model: str | None = None
    device_class: str | None = Field(default=None, description="the worker class asked for (null: any)")
    queue: str = Field(description="the queue the job waits in for a worker: train.<device class or any>.<model>")
    graders: list[dict[str, Any]] | None = Field(default=None, description="the end report's graders, as submitted")
    result: dict[str, Any] | None = Field(
        default=None, description="succeeded jobs: step kept, stopped_early, train_loss, train_mean_token_accuracy "
                                  "and, with a validation_file, full_valid_loss, full_valid_mean_token_accuracy, "
                                  "full_valid_exact_match, and base_model: the same for the base model. dpo jobs: "
                                  "train_preference_accuracy, train_reward_margin and, with a validation_file, "
                                  "full_valid_loss, full_valid_preference_accuracy, full_valid_reward_margin, "
                                  "full_valid_chosen_logps, full_valid_rejected_logps and "
                                  "full_valid_prefers_preferred (the pairs whose preferred answer is the more likely "
                                  "one), with base_model's full_valid_prefers_preferred")


def job_object(job: FineTuningJob) -> dict[str, Any]:
    hyperparameters = job.method.get(job.method["type"], {}).get("hyperparameters", {})
    error = JobError(code=job.error_code, message=job.error_message, param=job.error_param) \
        if job.error_code else None
    estimated = (int(job.progress_at + job.eta_seconds) if job.status == "running" and job.eta_seconds is not None
                 and job.progress_at is not None else None)
    return JobObject(
        id=job.id, model=job.model, status=job.status, created_at=job.created_at, finished_at=job.finished_at,
        fine_tuned_model=job.fine_tuned_model, trained_tokens=job.trained_tokens, training_file=job.training_file,
        validation_file=job.validation_file, method=job.method, hyperparameters=hyperparameters, error=error,
        seed=job.seed, metadata=job.job_metadata,
        progress=Progress(step=job.progress_step, total_steps=job.progress_total_steps,
                          epoch=job.progress_epoch, eta_seconds=job.eta_seconds),
        user_provided_suffix=job.suffix, organization_id=job.tenant_id, estimated_finish=estimated,
        from_model=job.from_model, result=job.result, device_class=job.device_class, graders=job.graders,
        queue=training_queue(job.model, job.device_class),
    ).model_dump()


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str = Field(description="info, warn or error")
    message: str
    type: str = Field(description="message or metrics")
    data: dict[str, Any] = Field(description="metrics: step, train_loss, train_mean_token_accuracy, valid_loss, "
                                             "valid_mean_token_accuracy, learning_rate, grad_norm, tokens_per_second, "
                                             "epoch (dpo jobs: train_/valid_preference_accuracy and "
                                             "train_/valid_reward_margin in place of token accuracy); start-up "
                                             "phases: phase, seconds")


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]
    fine_tuned_model_checkpoint: str = Field(description="a model name to use for inference")


def event_object(event: JobEvent) -> dict[str, Any]:
    return {"id": event.public_id, "object": "fine_tuning.job.event", "created_at": event.created_at,
            "level": event.level, "message": event.message, "type": event.type, "data": event.data or {}}


def checkpoint_object(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"id": checkpoint.id, "object": "fine_tuning.job.checkpoint", "created_at": checkpoint.created_at,
            "fine_tuning_job_id": checkpoint.job_id, "step_number": checkpoint.step_number,
            "metrics": checkpoint.metrics, "fine_tuned_model_checkpoint": checkpoint.fine_tuned_model_checkpoint}


class MetricsPoint(BaseModel):
    step: int
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    train_preference_accuracy: float | None = Field(default=None, description="dpo jobs: the step's pairs whose "
                                                                              "reward margin is positive")
    train_reward_margin: float | None = Field(default=None, description="dpo jobs: the step's mean reward margin")
    valid_preference_accuracy: float | None = None
    valid_reward_margin: float | None = None


class MetricsSeries(BaseModel):
    object: Literal["fine_tuning.job.metrics"] = "fine_tuning.job.metrics"
    fine_tuning_job_id: str
    data: list[MetricsPoint] = Field(description="one point per logged step, in step order; a metric not "
                                                 "logged at a step is null")
    stride: int = Field(default=1, description="1: every logged step in the range; k > 1: the range had more "
                                               "than max_points, so every k-th of them is here (and the last)")


class MethodObject(BaseModel):
    """A fine-tuning method a job may ask for: what the new-job form (and any client) builds its fields from."""

    id: str = Field(description="the name to give as method.type")
    object: Literal["fine_tuning.method"] = "fine_tuning.method"
    aliases: list[str] = Field(description="other names accepted as method.type")
    default: bool = Field(description="whether a job without method.type trains this method")
    hyperparameters: dict[str, Any] = Field(
        description="JSON schema of method.<id>.hyperparameters, the one requests are validated with: a "
                    "description per field, accepted ranges as minimum/maximum, choices as enum")
    defaults: dict[str, Any] = Field(
        description="the value each hyperparameter takes when not given, for `model` (and `training_file`'s "
                    "size; without it, the size-dependent ones are 'auto')")
