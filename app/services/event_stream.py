"""A job's events as a live stream: its history oldest first, then each new event once it is committed,
ending when the job has finished.

The database is the truth, so the stream reads it: a poll every `ADAPTERY_EVENT_STREAM_POLL_SECONDS` for
events after the last one sent. A job's events commit in id order (jobs.add_event holds the job row's lock
until its insert commits), so `id > last sent` never skips one that commits late, and a client that
reconnects with the last id it saw (`Last-Event-ID`) gets exactly what follows. A finished job's closing
events ("The job has successfully completed.", ...) are written just after its status changes, so the
stream ends with an `end` event once the job is finished and a poll that began FINISH_SETTLE_SECONDS after
it finished found nothing new. A paused job has not finished: the stream stays open (with keep-alive
pings) until it resumes and ends. Each poll also checks that the stream's key has not been revoked since.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from sqlalchemy import select

from app.db.models import TERMINAL_JOB_STATUSES, ApiKey, FineTuningJob, JobEvent, JobStatus
from app.db.session import session_scope
from app.errors import InvalidRequest, LimitReached, error_body
from app.schemas.fine_tuning import event_object

PAGE = 500
FINISH_SETTLE_SECONDS = 2.0
IDLE_POLL_SECONDS = 4.0
WAITING_STATUSES = frozenset({JobStatus.queued, JobStatus.paused})


class StreamCount:
    """Event streams open per tenant in this process, against ADAPTERY_MAX_OPEN_STREAMS_PER_TENANT: each costs a
    poll every interval, so one tenant's hundred streams would slow every other tenant's requests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[str, int] = {}

    def take(self, tenant: str, limit: int) -> Callable[[], None]:
        """Count one more stream of `tenant` (429 past `limit`); returns its release, which may be called twice."""
        with self.lock:
            if self.open.get(tenant, 0) >= limit:
                raise LimitReached(f"This tenant already has {limit} event streams open in this process "
                                   "(ADAPTERY_MAX_OPEN_STREAMS_PER_TENANT); close one, or poll the events list.",
                                   code="too_many_open_streams", retry_after=5)
            self.open[tenant] = self.open.get(tenant, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            with self.lock:
                if not released:
                    released = True
                    self.open[tenant] -= 1
        return release


open_streams = StreamCount()


def resume_point(job_id: str, last_event_id: str | None) -> int:
    """The sequence number to continue after: 0 for the whole history, else that of `last_event_id`."""
    if not last_event_id:
        return 0
    with session_scope() as session:
        seq = session.scalar(select(JobEvent.id).where(JobEvent.public_id == last_event_id,
                                                       JobEvent.job_id == job_id))
    if seq is None:
        raise InvalidRequest(f"Last-Event-ID '{last_event_id[:64]}' is not an event of job {job_id}; reconnect "
                             "with the id of the last event received, or without it for the whole history.",
                             param="Last-Event-ID", code="invalid_last_event_id")
    return int(seq)


def _poll(job_id: str, after_seq: int, key_hash: str | None) -> tuple[list[JobEvent], str, int | None] | None:
    """(events after `after_seq`, oldest first; the job's status and finished_at, read before them); None once
    the key the stream was opened with has been revoked."""
    with session_scope() as session:
        if key_hash is not None and session.scalar(select(ApiKey.id).where(
                ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))) is None:
            return None
        status, finished_at = session.execute(select(FineTuningJob.status, FineTuningJob.finished_at)
                                              .where(FineTuningJob.id == job_id)).one()
        rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_seq)
                                    .order_by(JobEvent.id).limit(PAGE)))
        session.expunge_all()
    return rows, str(status), finished_at


async def job_events(job_id: str, *, after_seq: int, poll_seconds: float,
                     key_hash: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """Server-sent events (sse-starlette's dicts): one per job event, its id the event's id, then `end`; or an
    `error` event and the end once `key_hash`'s key is revoked (an open stream is no exception to a revocation)."""
    cursor, idle = after_seq, 0
    while True:
        polled_at = time.time()
        polled = await anyio.to_thread.run_sync(_poll, job_id, cursor, key_hash)
        if polled is None:
            yield {"event": "error", "data": json.dumps(error_body("The API key of this stream was revoked.",
                                                                   "invalid_request_error", None, "invalid_api_key"))}
            return
        rows, status, finished_at = polled
        for row in rows:
            cursor = row.id
            yield {"id": row.public_id, "event": "fine_tuning.job.event", "data": json.dumps(event_object(row))}
        if len(rows) == PAGE:
            continue  # more history: no waiting
        settled = finished_at is not None and polled_at >= finished_at + FINISH_SETTLE_SECONDS
        if status in TERMINAL_JOB_STATUSES and not rows and settled:
            yield {"event": "end", "data": json.dumps({"id": job_id, "status": status})}
            return
        # A queued or paused job writes nothing until someone acts on it: its stream polls less often the longer
        # it stays so (up to IDLE_POLL_SECONDS), so idle streams cost little; any event brings it back.
        idle = idle + 1 if not rows and status in WAITING_STATUSES else 0
        await anyio.sleep(min(poll_seconds * 2 ** idle, max(poll_seconds, IDLE_POLL_SECONDS)))
