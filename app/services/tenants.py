"""Tenants and API keys: creation, revocation, lookup by bearer key, and the first-start bootstrap."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import DEFAULT_TENANT, ApiKey, Tenant, now
from app.errors import Unauthorized, not_found
from app.services.ids import new_id, storable

KEY_PREFIX = "sk-ady-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def add_key(session: Session, *, tenant_id: str, key: str | None = None) -> tuple[ApiKey, str]:
    """Store a key for a tenant; returns the row and the key itself (shown to the caller once)."""
    key = key or generate_key()
    row = ApiKey(id=new_id("key"), tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:10], created_at=now())
    session.add(row)
    session.commit()
    return row, key


def create_tenant(session: Session, *, name: str, tenant_id: str | None = None) -> tuple[Tenant, str]:
    tenant = Tenant(id=tenant_id or new_id("tenant"), name=name, created_at=now())
    session.add(tenant)
    session.commit()
    _, key = add_key(session, tenant_id=tenant.id)
    return tenant, key


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id) if storable(key_id) else None
    if row is None:
        raise not_found("API key", key_id, param="key_id")
    session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now()))
    session.commit()
    session.refresh(row)
    with _known_lock:
        _known_keys.pop(row.key_hash, None)  # at once in this process; other processes within KEY_CACHE_SECONDS
    return row


# Keys seen valid in the last KEY_CACHE_SECONDS, by hash: a tenant's every request (a flood of refused ones too)
# would otherwise cost a database query before anything can refuse it. Only valid keys are kept; a revocation
# applies at once in the process that made it and within KEY_CACHE_SECONDS in the others.
KEY_CACHE_SECONDS = 2.0
KEY_CACHE_SIZE = 10_000
_known_keys: dict[str, tuple[str, float]] = {}
_known_lock = threading.Lock()


def known_tenant_for_key(key: str) -> str | None:
    """The tenant of a key found valid in the last KEY_CACHE_SECONDS, without a lookup (no I/O: an async route may
    ask before it sends a lookup to a thread)."""
    with _known_lock:
        known = _known_keys.get(hash_key(key))
    return known[0] if known is not None and known[1] > time.monotonic() else None


def cached_tenant_for_key(session_factory: Callable[[], Session], key: str) -> str | None:
    """`tenant_for_key`, answered from the cache of recently valid keys when it can be."""
    known = known_tenant_for_key(key)
    if known is not None:
        return known
    digest = hash_key(key)
    moment = time.monotonic()
    with session_factory() as session:
        tenant = tenant_for_key(session, key)
    if tenant is not None:
        with _known_lock:
            if len(_known_keys) >= KEY_CACHE_SIZE:
                _known_keys.clear()  # rare (that many keys in two seconds): start again rather than track order
            _known_keys[digest] = (tenant, moment + KEY_CACHE_SECONDS)
    return tenant


def tenant_for_key(session: Session, key: str) -> str | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    # The lookup is by hash; compare again in constant time so no timing tells how much of a key matched.
    if row is None or not hmac.compare_digest(row.key_hash, hash_key(key)):
        return None
    return row.tenant_id


def is_admin_key(key: str, admin_key: str) -> bool:
    return bool(admin_key) and hmac.compare_digest(hash_key(key), hash_key(admin_key))


def bearer(authorization: str | None) -> str:
    if not authorization or not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
    return authorization[7:].strip()


def bootstrap(session: Session, *, data_dir: Path, explicit_key: str) -> str | None:
    """On first start, a local tenant (id "default") and a key; returns the key when one was created.

    The key is written to <data dir>/bootstrap_key (mode 0600). ADAPTERY_BOOTSTRAP_KEY fixes the key
    (tests and scripts), and is added to the local tenant on later starts too.
    """
    # API replicas may start together on an empty database: whichever inserts second finds the row there.
    if session.get(Tenant, DEFAULT_TENANT) is None:
        try:
            session.add(Tenant(id=DEFAULT_TENANT, name="local", created_at=now()))
            session.commit()
        except IntegrityError:
            session.rollback()
    if explicit_key:
        if session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(explicit_key))) is None:
            try:
                add_key(session, tenant_id=DEFAULT_TENANT, key=explicit_key)
            except IntegrityError:
                session.rollback()
        return None
    if session.scalar(select(ApiKey.id).where(ApiKey.tenant_id == DEFAULT_TENANT)) is not None:
        return None
    _, key = add_key(session, tenant_id=DEFAULT_TENANT)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "bootstrap_key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key
