"""Where each adapter a serving process has seen lives: its lifecycle state, and the two bounded tiers.

An adapter is `on_disk` (only its files), `cpu` (its weights in memory), `active` (also copied into an
adapter slot, servable in a batch) or `failed` (refused at load, with the reason). Both tiers are the
same LRU abstraction: the least recently used entry that is neither pinned nor in use goes first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class AdapterState(StrEnum):
    ON_DISK = "on_disk"
    CPU = "cpu"
    ACTIVE = "active"
    FAILED = "failed"


@dataclass
class Residency:
    """What a serving process knows about one adapter it has seen (the residency API shows this)."""

    key: str
    state: AdapterState
    pinned: bool = False
    pinned_by: str | None = None  # who pinned it (a tenant): pins are a per-tenant quota
    last_used_at: float | None = None
    load_ms: float | None = None
    rank: int | None = None
    method: str | None = None
    size_bytes: int | None = None
    error: str | None = None


class LruTier(Generic[K, V]):
    """A bounded map in least-recently-used order: at most `capacity` entries and, with `max_bytes`, at most that
    many bytes by `size_of`. Eviction skips entries `keep(key)` protects (pinned, serving a request); when every
    entry is protected the tier stays over capacity until one is free."""

    def __init__(self, capacity: int, keep: Callable[[K], bool], *, max_bytes: int | None = None,
                 size_of: Callable[[V], int] | None = None):
        self.capacity = capacity
        self.keep = keep
        self.max_bytes, self.size_of = max_bytes, size_of
        self.entries: OrderedDict[K, V] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self.entries)

    def get(self, key: K) -> V | None:
        return self.entries.get(key)

    def touch(self, key: K) -> None:
        if key in self.entries:
            self.entries.move_to_end(key)

    def put(self, key: K, value: V) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)

    def pop(self, key: K) -> V | None:
        return self.entries.pop(key, None)

    def victim(self) -> K | None:
        """The least recently used entry that may go, or None."""
        return next((key for key in self.entries if not self.keep(key)), None)

    def overflow(self) -> list[K]:
        """Entries to evict so the tier fits its capacity (least recently used first, protected ones skipped)."""
        candidates = [key for key in self.entries if not self.keep(key)]
        evicted = candidates[:max(0, len(self.entries) - self.capacity)]
        if self.max_bytes is not None and self.size_of is not None:
            size_of = self.size_of
            held = sum(size_of(value) for key, value in self.entries.items() if key not in evicted)
            for key in candidates[len(evicted):]:
                if held <= self.max_bytes:
                    break
                evicted.append(key)
                held -= size_of(self.entries[key])
        return evicted


class ResidencyBook:
    """Every adapter's Residency record, changed only through these transitions."""

    def __init__(self) -> None:
        self.records: dict[str, Residency] = {}

    def get(self, key: str) -> Residency | None:
        return self.records.get(key)

    def pinned(self, key: str) -> bool:
        record = self.records.get(key)
        return bool(record and record.pinned)

    def loaded(self, key: str, *, method: str, rank: int, load_ms: float, size_bytes: int) -> None:
        previous = self.records.get(key)
        self.records[key] = Residency(key=key, state=AdapterState.CPU, pinned=bool(previous and previous.pinned),
                                      pinned_by=previous.pinned_by if previous else None,
                                      load_ms=round(load_ms, 3), rank=rank or None, method=method,
                                      size_bytes=size_bytes, last_used_at=time.time())

    def failed(self, key: str, *, method: str | None, error: str) -> None:
        self.records[key] = Residency(key=key, state=AdapterState.FAILED, method=method, error=error)

    def forget(self, key: str) -> None:
        """No record of the adapter at all (one whose import was refused: it never existed for anyone)."""
        self.records.pop(key, None)

    def move(self, key: str, state: AdapterState) -> None:
        if key in self.records:
            self.records[key].state = state

    def used(self, key: str) -> None:
        if key in self.records:
            self.records[key].last_used_at = time.time()

    def pin(self, key: str, pinned: bool, owner: str | None = None) -> None:
        if key in self.records:
            self.records[key].pinned = pinned
            self.records[key].pinned_by = owner if pinned else None

    def pinned_by(self, owner: str) -> int:
        """How many adapters `owner` has pinned."""
        return sum(1 for r in self.records.values() if r.pinned and r.pinned_by == owner)

    def view(self) -> list[Residency]:
        return [Residency(**vars(r)) for r in self.records.values()]
