"""Releasing a counted place (an open stream, a generation in flight) when the body that holds it ends, however it
ends: sent to the end, cut by the client, or dropped before it started."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TypeVar

Item = TypeVar("Item")


def released_at_end(body: AsyncIterable[Item], release: Callable[[], None]) -> AsyncIterator[Item]:
    """`body`, calling `release` once it ends; `release` must be safe to call twice. A body dropped before its
    first item never runs its `finally`, so its garbage collection releases too."""

    async def relay() -> AsyncIterator[Item]:
        try:
            async for item in body:
                yield item
        finally:
            release()

    relayed = relay()
    weakref.finalize(relayed, release)
    return relayed
