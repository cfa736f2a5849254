"""Requests per minute per API key: a fixed one-minute window, counted in Redis when Redis is the broker
(so every API replica shares the count), else in this process."""

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


def _count(settings: Settings, key_id: str, window: int) -> int:
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        try:
            client = _redis(url)
            name = f"adaptery:ratelimit:{key_id}:{window}"
            pipe = client.pipeline()
            pipe.incr(name)
            pipe.expire(name, 120)
            return int(pipe.execute()[0])
        except Exception:  # Redis down: fall back to this process's count rather than refuse everyone
            pass
    with _local_lock:
        for stale in [k for k in _local if k[1] < window]:
            del _local[stale]
        _local[(key_id, window)] = _local.get((key_id, window), 0) + 1
        return _local[(key_id, window)]


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
