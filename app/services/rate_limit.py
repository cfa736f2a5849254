"""Requests per minute per API key, and failed authentications per minute per client address: fixed one-minute
windows, counted in Redis when Redis is the broker (so every API replica shares the count), else in this
process."""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from typing import Any

from app.errors import LimitReached
from app.settings import Settings

_local: dict[tuple[str, int], int] = {}
_local_lock = threading.Lock()


@lru_cache(maxsize=4)
def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def _count(settings: Settings, key_id: str, window: int, *, add: int = 1) -> int:
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        try:
            client = _redis(url)
            name = f"adaptery:ratelimit:{key_id}:{window}"
            pipe = client.pipeline()
            pipe.incrby(name, add)
            pipe.expire(name, 120)
            return int(pipe.execute()[0])
        except Exception:  # Redis down: fall back to this process's count rather than refuse everyone
            pass
    with _local_lock:
        for stale in [k for k in _local if k[1] < window]:
            del _local[stale]
        _local[(key_id, window)] = _local.get((key_id, window), 0) + add
        return _local[(key_id, window)]


def counts_in_redis(settings: Settings) -> bool:
    """Whether a check makes a network call (the counts live in the broker's Redis): run it off the event loop."""
    # broker_url, not resolved_broker_url: unset, it names the embedded broker, and resolving its path is a
    # file-system call this must not make on the event loop.
    return settings.rate_limit_per_minute > 0 and settings.broker_url.startswith(("redis://", "rediss://"))


def check(settings: Settings, key_id: str) -> None:
    if settings.rate_limit_per_minute <= 0:
        return
    now = time.time()
    window = int(now // 60)
    if _count(settings, key_id, window) > settings.rate_limit_per_minute:
        retry = max(1, int(60 - now % 60))
        raise LimitReached(f"Rate limit of {settings.rate_limit_per_minute} requests per minute reached for this "
                           f"API key; retry in {retry} s.", code="rate_limit_exceeded",
                           retry_after=retry)


def check_failed_authentication(settings: Settings, client_address: str) -> None:
    """Refuse a client address that has sent more wrong keys this minute than ADAPTERY_FAILED_AUTH_PER_MINUTE,
    before looking its key up: wrong keys cost a lookup each, and guessing keys is no one's legitimate work."""
    limit = settings.failed_auth_per_minute
    if limit <= 0:
        return
    now = time.time()
    if _count(settings, f"authfail:{client_address}", int(now // 60), add=0) >= limit:
        retry = max(1, int(60 - now % 60))
        raise LimitReached(f"Too many requests with a wrong API key from this address ({limit} per minute, "
                           f"ADAPTERY_FAILED_AUTH_PER_MINUTE); retry in {retry} s.",
                           code="too_many_failed_authentications", retry_after=retry)


def record_failed_authentication(settings: Settings, client_address: str) -> None:
    if settings.failed_auth_per_minute > 0:
        _count(settings, f"authfail:{client_address}", int(time.time() // 60))
