"""Ownership of a queued row by lease: one guarded UPDATE per transition, shared by fine-tuning jobs and
evaluations.

A worker claims a queued row (or a running one whose lease expired) and owns it while it renews the lease.
Every status change is one UPDATE guarded by the statuses it may leave (`... WHERE status IN (expected)`) and,
with an owner, by the lease, so two processes racing on the same row cannot both win: a duplicate delivery or
a worker that lost its lease changes nothing. The reaper hands back the rows of workers that vanished and
re-sends queued rows nobody claimed.

Fair queues. The broker is FIFO and carries ids only, so fairness is decided here, before a row is sent: a row is
handed to the broker only while its tenant has fewer than `max_in_flight_per_tenant` rows in flight in the same
lane (the same broker queue: running, or sent and not yet claimed). The others stay queued with no `enqueued_at`
(held) and are sent, oldest first, when one of the tenant's rows ends (`send_held_*` in app/queue.py, called
where jobs end: the worker's task, the API's cancel and pause) and by every reaper tick, which already offers
every never-sent queued row. One tenant's burst therefore puts at most that many messages ahead of another
tenant's first. This was chosen over a worker that claims "the fairest" row instead of the one its message
names because it changes nothing on the claim side: leases, duplicate deliveries, kill -9 recovery, pause and
resume keep exactly their meaning (a message still means "train this row"), a held row is an ordinary queued
row (cancelling or pausing it needs nothing new, and it is never sent), and a handed-back row is simply
not-yet-sent again. The reservation is one guarded UPDATE (`enqueued_at IS NULL` and the lane's in-flight count
under the limit), so two reapers never both send one held row; on PostgreSQL two senders of different rows may
both pass the count at once, overshooting the limit by one each, which costs a little fairness, never work.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Collection
from typing import Any, Generic, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased

from app.db.models import Evaluation, FineTuningJob, now

Row = TypeVar("Row", FineTuningJob, Evaluation)
Status = TypeVar("Status", bound=enum.StrEnum)


class Leases(Generic[Row, Status]):
    """The lease transitions of one table: its rows wait in `queued`, run in `running` under a lease, and end
    in `failed` when their workers are lost too often. `noun` names a row in the messages it stores."""

    def __init__(self, model: type[Row], *, queued: Status, running: Status, failed: Status, noun: str,
                 lane: tuple[str, ...] = ("tenant_id",),
                 on_transition: Callable[[Session, str, str], None] | None = None) -> None:
        self.model: type[Row] = model
        self.queued, self.running, self.failed, self.noun = queued, running, failed, noun
        # The columns that pick a row's broker queue, tenant first: fairness is counted per tenant and queue.
        self.lane = lane
        # (session, row id, new status): runs in the transaction of every transition made, before its commit
        # (the jobs' webhook outbox).
        self.on_transition = on_transition

    def transition(self, session: Session, row_id: str, expected: Collection[Status], new: Status, *,
                   owner: str | None = None, lease_expired_before: float | None = None,
                   then: Callable[[Session], None] | None = None, **values: Any) -> bool:
        """One guarded UPDATE; with `owner`, only the worker holding the row's lease can make it; with
        `lease_expired_before`, only while that lease is still expired (its holder has not renewed it since)."""
        model = self.model
        query = update(model).where(model.id == row_id, model.status.in_([s.value for s in expected]))
        if owner is not None:
            query = query.where(model.lease_owner == owner)
        if lease_expired_before is not None:
            query = query.where(model.lease_expires_at < lease_expired_before)
        result = session.execute(query.values(status=new.value, **values))
        changed = result.rowcount == 1  # type: ignore[attr-defined]
        if changed and self.on_transition is not None:
            self.on_transition(session, row_id, new.value)
        if changed and then is not None:  # the caller's writes that must commit with the change (its events)
            then(session)
        session.commit()
        return bool(changed)

    def mark_enqueued(self, session: Session, row_id: str) -> None:
        """Handed to the broker now; the reaper re-sends a queued row only once this is old."""
        session.execute(update(self.model).where(self.model.id == row_id).values(enqueued_at=time.time()))
        session.commit()

    def claim(self, session: Session, row_id: str, *, owner: str, lease_seconds: float,
              max_attempts: int) -> int | None:
        """queued (or running with an expired lease) → running, owned by `owner`.

        Exactly one worker wins; a duplicate delivery, or one racing a live lease, or one past the attempts cap,
        gets None. Returns the attempt number.
        """
        model, moment = self.model, time.time()
        result = session.execute(
            update(model)
            .where(model.id == row_id, model.attempts < max_attempts,
                   (model.status == self.queued.value)
                   | ((model.status == self.running.value) & (model.lease_expires_at < moment)))
            .values(status=self.running.value, lease_owner=owner, lease_expires_at=moment + lease_seconds,
                    attempts=model.attempts + 1, started_at=func.coalesce(model.started_at, now())))
        session.commit()
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
        return int(session.scalar(select(model.attempts).where(model.id == row_id)) or 0)

    def renew(self, session: Session, row_id: str, *, owner: str, lease_seconds: float) -> bool:
        """Extend the lease; False means another worker owns the row now (or it left `running`)."""
        model = self.model
        result = session.execute(
            update(model)
            .where(model.id == row_id, model.lease_owner == owner, model.status == self.running.value)
            .values(lease_expires_at=time.time() + lease_seconds))
        session.commit()
        return result.rowcount == 1  # type: ignore[attr-defined]

    def release(self, session: Session, row_id: str, *, owner: str) -> bool:
        """running → queued, handing the row back (worker shutdown) with no owner and as never sent, so the next
        reap sends it again."""
        return self.transition(session, row_id, {self.running}, self.queued, owner=owner, lease_owner=None,
                               lease_expires_at=None, enqueued_at=None)

    def hand_back_expired(self, session: Session, *, moment: float, max_attempts: int,
                          on_lost: Callable[[Row, bool], None] | None = None) -> None:
        """Recover from workers that vanished: running rows whose lease expired before `moment` go back to the
        queue, or fail once out of attempts. Each change is guarded by the lost worker's lease, so a worker that
        claimed the row meanwhile keeps it, and by the expiry read, so a worker that renewed its lease between
        the read and the change keeps it too; `on_lost(row, failed)` follows each change this call made."""
        model = self.model
        expired = list(session.scalars(select(model).where(model.status == self.running.value,
                                                           model.lease_expires_at < moment)))
        for row in expired:
            if row.attempts >= max_attempts:
                failed = True
                changed = self.transition(
                    session, row.id, {self.running}, self.failed, owner=row.lease_owner,
                    lease_expired_before=moment, finished_at=now(),
                    error_code="worker_lost", lease_expires_at=None,
                    error_message=f"the worker running this {self.noun} was lost {row.attempts} times; giving up")
            else:
                failed = False
                changed = self.transition(session, row.id, {self.running}, self.queued, owner=row.lease_owner,
                                          lease_expired_before=moment, lease_owner=None, lease_expires_at=None,
                                          enqueued_at=None)
            if changed and on_lost is not None:
                on_lost(row, failed)

    def unclaimed(self, session: Session, *, since: float) -> list[str]:
        """Queued rows not handed to the broker since `since` (or never): the ids to send again, oldest first (so
        a tenant's held rows go in the order they were submitted)."""
        model = self.model
        return list(session.scalars(select(model.id).where(
            model.status == self.queued.value, (model.enqueued_at.is_(None)) | (model.enqueued_at < since))
            .order_by(model.seq)))

    def reserve_send(self, session: Session, row_id: str, *, limit: int) -> bool:
        """May this queued row be sent to the broker now? Marks it sent (`enqueued_at`) when so. A row already
        sent once (a re-send) may always go again; a never-sent one only while its tenant has fewer than `limit`
        rows in flight in its lane (else it stays held). False too for a row that is no longer queued or that
        another process reserved meanwhile: exactly one sender wins each reservation."""
        model = self.model
        row = session.execute(select(model.status, model.enqueued_at, *(getattr(model, c) for c in self.lane))
                              .where(model.id == row_id)).one_or_none()
        if row is None or row[0] != self.queued.value:
            return False
        moment = time.time()
        query = update(model).where(model.id == row_id, model.status == self.queued.value)
        if row[1] is not None:
            query = query.where(model.enqueued_at == row[1])
        else:
            other = aliased(model)
            same_lane = [getattr(other, c).is_(None) if value is None else getattr(other, c) == value
                         for c, value in zip(self.lane, row[2:], strict=True)]
            in_flight = select(func.count()).select_from(other).where(
                *same_lane, (other.status == self.running.value)
                | ((other.status == self.queued.value) & other.enqueued_at.is_not(None))).scalar_subquery()
            query = query.where(model.enqueued_at.is_(None), in_flight < limit)
        result = session.execute(query.values(enqueued_at=moment))
        session.commit()
        return result.rowcount == 1  # type: ignore[attr-defined]

    def unreserve(self, session: Session, row_id: str) -> None:
        """The send failed (broker down): the row counts as never sent again, so it is not in flight and the
        reaper sends it when the broker is back."""
        session.execute(update(self.model).where(self.model.id == row_id, self.model.status == self.queued.value)
                        .values(enqueued_at=None))
        session.commit()

    def held(self, session: Session, row_id: str, *, limit: int) -> list[str]:
        """The never-sent queued rows in `row_id`'s lane, oldest first (at most `limit`): what to offer the broker
        when one of the lane's rows ends."""
        model = self.model
        values = session.execute(select(*(getattr(model, c) for c in self.lane))
                                 .where(model.id == row_id)).one_or_none()
        if values is None:
            return []
        same_lane = [getattr(model, c).is_(None) if value is None else getattr(model, c) == value
                     for c, value in zip(self.lane, values, strict=True)]
        return list(session.scalars(select(model.id).where(
            *same_lane, model.status == self.queued.value, model.enqueued_at.is_(None))
            .order_by(model.seq).limit(limit)))
