"""Fine-tuning jobs, by concern: creation (validated at submit time) and the methods catalogue, the status state
machine (one guarded UPDATE per transition), the history a job leaves (events, checkpoints), and reads. Callers
use the package: `from app.services import jobs; jobs.claim(...)`."""

from app.services.jobs.creation import (
    SIZE_DEPENDENT_HYPERPARAMETERS,
    create_job,
    fine_tuned_model_name,
    method_catalogue,
)
from app.services.jobs.history import add_checkpoint, add_event, list_checkpoints, list_events
from app.services.jobs.reads import get_job, list_jobs
from app.services.jobs.transitions import (
    claim,
    held,
    mark_cancelled,
    mark_enqueued,
    mark_failed,
    mark_paused,
    mark_queued,
    mark_succeeded,
    reap,
    record_progress,
    record_result,
    release,
    renew_lease,
    request_cancel,
    request_pause,
    reserve_send,
    resume,
    stop_requests,
    unreserve,
)

__all__ = ["SIZE_DEPENDENT_HYPERPARAMETERS", "add_checkpoint", "add_event", "claim", "create_job",
           "fine_tuned_model_name", "get_job", "held", "list_checkpoints", "list_events", "list_jobs",
           "mark_cancelled", "mark_enqueued", "mark_failed", "mark_paused", "mark_queued", "mark_succeeded",
           "method_catalogue", "reap", "record_progress", "record_result", "release", "renew_lease", "request_cancel",
           "request_pause", "reserve_send", "resume", "stop_requests", "unreserve"]
