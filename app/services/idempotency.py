"""Idempotency-Key for POSTs that create something: the same key and body replay the first response;
the same key with another body is a 409. Concurrent requests with one key create exactly one object."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import IdempotencyKey
from app.errors import Conflict, DomainError, InvalidRequest, http_answer

WAIT_FOR_FIRST_SECONDS = 30.0


def body_hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def run_once(session: Session, *, tenant_id: str, key: str | None, request_hash: str,
             create: Callable[[], dict[str, Any]]) -> Any:
    """Run `create` at most once per (tenant, key); repeats get the stored response."""
    if key is None:
        return create()
    if not 1 <= len(key) <= 255:
        raise InvalidRequest("Idempotency-Key must be 1-255 characters.", param="Idempotency-Key",
                             code="invalid_idempotency_key")
    try:
        session.add(IdempotencyKey(tenant_id=tenant_id, key=key, request_hash=request_hash))
        session.commit()
    except IntegrityError:
        session.rollback()
        return _replay(session, tenant_id, key, request_hash)
    try:
        body = create()
    except DomainError as exc:  # a refusal is the answer for this key too
        status, error, _ = http_answer(exc)
        _store(session, tenant_id, key, status, error)
        raise
    except BaseException:  # nothing was created: free the key so a retry can run
        session.rollback()
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id,
                                                     IdempotencyKey.key == key))
        session.commit()
        raise
    _store(session, tenant_id, key, 200, body)
    return body


def _store(session: Session, tenant_id: str, key: str, status: int, body: dict[str, Any]) -> None:
    row = session.get(IdempotencyKey, (tenant_id, key))
    if row is not None:
        row.status_code, row.response = status, body
        session.commit()


def _replay(session: Session, tenant_id: str, key: str, request_hash: str) -> JSONResponse:
    deadline = time.monotonic() + WAIT_FOR_FIRST_SECONDS
    while True:
        session.expire_all()
        row = session.scalar(select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id,
                                                          IdempotencyKey.key == key))
        if row is None:
            raise Conflict("The first request with this Idempotency-Key failed; retry with a new key.",
                           param="Idempotency-Key", code="idempotency_key_failed")
        if row.request_hash != request_hash:
            raise Conflict("This Idempotency-Key was already used with a different request body.",
                           param="Idempotency-Key", code="idempotency_key_reused")
        if row.response is not None and row.status_code is not None:
            return JSONResponse(row.response, status_code=row.status_code, headers={"Idempotent-Replayed": "true"})
        if time.monotonic() > deadline:
            raise Conflict("A request with this Idempotency-Key is still in progress.",
                           param="Idempotency-Key", code="idempotency_key_in_progress", retry_after=1)
        time.sleep(0.1)
