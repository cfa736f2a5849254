"""The adapters one base model's runtime serves from: their residency records and the two bounded tiers (weights
in memory, adapter slots in the slot bank), with least-recently-used eviction that never takes a pinned adapter or
one a request is using. Which adapters and slots are in use is the scheduler's to say (the `rows_in_use`
callback); the cache knows nothing of requests or threads. Writes into the slot bank hold `bank_lock`, the lock
the scheduler holds around a forward pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import serving_metrics as metrics
from adapters.engine.adapter_loader import AdapterLoadError, LoadedAdapter, load_adapter
from adapters.engine.residency import AdapterState, LruTier, Residency, ResidencyBook
from adapters.engine.slot_bank import SlotBank

log = logging.getLogger("adaptery.engine")


@dataclass
class AdapterRef:
    """Where to find an adapter: a stable key (its id), its folder, and the base model it needs."""

    key: str
    folder: Path
    base_model: str
    method: str | None = None


# (adapter key or None for the base model, slot) of every request waiting or running.
RowsInUse = Callable[[], list[tuple[str | None, int]]]


class AdapterCache:
    """The adapters of one base model: loaded from disk into memory (`load`), into a slot (`activate`), out again
    (`unload`, or evicted when a tier is full), pinned or not; every change recorded in the residency book."""

    def __init__(self, *, model: Any, bank: SlotBank, max_rank: int, cache_size: int, cpu_cache_size: int,
                 rows_in_use: RowsInUse, lock: threading.RLock, bank_lock: threading.Lock, name: str = "",
                 cpu_cache_bytes: int | None = None):
        self.model, self.bank, self.max_rank, self.name = model, bank, max_rank, name
        self.device = next(model.parameters()).device
        self.cache_size = cache_size
        self.rows_in_use = rows_in_use
        self.lock, self.bank_lock = lock, bank_lock
        self.book = ResidencyBook()
        # Neither tier evicts a pinned adapter or one serving a row; weights stay in memory while their adapter
        # holds a slot. The memory tier is bounded in bytes too: a count alone lets large adapters of a big base
        # model exhaust memory.
        self.in_memory: LruTier[str, LoadedAdapter] = LruTier(
            max(cpu_cache_size, cache_size), keep=lambda key: key in self.in_slots or self.book.pinned(key),
            max_bytes=cpu_cache_bytes, size_of=lambda loaded: loaded.size_bytes)
        self.in_slots: LruTier[str, int] = LruTier(cache_size, keep=self._slot_busy_or_pinned)
        # Deleted adapters a request was still using: dropped as soon as none does (swept at each activation).
        self.doomed: set[str] = set()

    # ------------------------------------------------------------ what services read and change

    def residency(self, key: str) -> Residency | None:
        with self.lock:
            record = self.book.get(key)
            return Residency(**vars(record)) if record is not None else None

    def residencies(self) -> list[Residency]:
        with self.lock:
            return self.book.view()

    def in_memory_keys(self) -> list[str]:
        """Adapters whose weights are in memory (cpu or active), least recently used first."""
        with self.lock:
            return list(self.in_memory)

    def slot(self, key: str) -> int | None:
        """The slot an active slot-kind adapter occupies, or None."""
        with self.lock:
            return self.in_slots.get(key)

    def pin(self, key: str, pinned: bool, owner: str | None = None) -> None:
        """Pin (or unpin) an adapter; `owner` (a tenant) is whose pin quota it counts against."""
        with self.lock:
            self.book.pin(key, pinned, owner)

    def pinned_count(self, owner: str | None = None) -> int:
        """Pinned adapters: all of them, or those `owner` pinned."""
        with self.lock:
            if owner is not None:
                return self.book.pinned_by(owner)
            return sum(r.pinned for r in self.book.records.values())

    # ------------------------------------------------------------ the tiers

    def _slot_busy_or_pinned(self, key: str) -> bool:
        slot = self.in_slots.get(key)
        return self.book.pinned(key) or slot in {s for _, s in self.rows_in_use() if s}

    def load(self, ref: AdapterRef) -> LoadedAdapter:
        """The adapter's weights in memory (from disk if needed), checked against this base model. Runs in the
        caller's thread, so a slow disk never stalls the batch."""
        with self.lock:
            loaded = self.in_memory.get(ref.key)
            if loaded is not None:
                self.in_memory.touch(ref.key)
                self.book.used(ref.key)
                return loaded
        try:
            started = time.perf_counter()
            loaded = load_adapter(ref.folder, key=ref.key, model_config=self.model.config, max_rank=self.max_rank,
                                  device=self.device)
            metrics.ADAPTER_LOAD_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            metrics.ADAPTER_LOADS.labels(self.name).inc()
            if loaded.kind.uses_slot:
                self.bank.check(loaded.weights)
        except (KeyError, ValueError, OSError) as exc:
            error = exc if isinstance(exc, AdapterLoadError) else AdapterLoadError(
                f"adapter {ref.key} could not be loaded: {exc}")
            with self.lock:
                self.book.failed(ref.key, method=ref.method, error=str(error))
            raise error from exc
        with self.lock:
            if ref.key not in self.in_memory:
                self.in_memory.put(ref.key, loaded)
                self.book.loaded(ref.key, method=ref.method or loaded.method, rank=loaded.rank,
                                 load_ms=loaded.load_ms, size_bytes=loaded.size_bytes)
                self._evict_from_memory()
            self.in_memory.touch(ref.key)
            self.book.used(ref.key)
            return self.in_memory.get(ref.key) or loaded

    def _evict_from_memory(self) -> None:
        for key in self.in_memory.overflow():
            self.in_memory.pop(key)
            self.book.move(key, AdapterState.ON_DISK)
            metrics.ADAPTER_EVICTIONS.labels(self.name, "memory").inc()

    def drop(self, key: str) -> bool:
        """The adapter was deleted: unpin it and drop its slot, weights and record now, or, while a request still
        uses it, as soon as none does (requests in flight finish on it). True if nothing of it is left. Call it
        between two forward passes (the scheduler's thread)."""
        with self.lock:
            self.doomed.add(key)
            self._sweep_doomed()
            return key not in self.doomed

    def _sweep_doomed(self) -> None:
        if not self.doomed:
            return
        in_use = {used for used, _ in self.rows_in_use()}
        for key in list(self.doomed - in_use):
            self.book.pin(key, False)
            self.unload(key)
            self.book.forget(key)
            self.doomed.discard(key)

    def activate(self, adapter: LoadedAdapter | str) -> int:
        """Make a loaded adapter servable and return its slot (0 for kinds that need none); -1 when every slot is
        serving a request or pinned right now. Call it between two forward passes (the scheduler's thread)."""
        with self.lock:
            self._sweep_doomed()
            loaded = self.in_memory.get(adapter) if isinstance(adapter, str) else adapter
            if loaded is None:
                raise KeyError(f"adapter {adapter} is not loaded")
            key = loaded.key
            if key not in self.in_memory:  # its weights left memory while the request waited
                self.in_memory.put(key, loaded)
                self.book.move(key, AdapterState.CPU)
            self.in_memory.touch(key)
            if not loaded.kind.uses_slot:
                return 0
            slot = self.in_slots.get(key)
            if slot is not None:
                self.in_slots.touch(key)
                return slot
            taken = set(self.in_slots.entries.values())
            free = [s for s in range(1, self.bank.n_slots) if s not in taken]
            if not free:
                victim = self.in_slots.victim()
                if victim is None:
                    return -1
                free = [self.in_slots.pop(victim) or 0]
                self.book.move(victim, AdapterState.CPU)
                metrics.ADAPTER_EVICTIONS.labels(self.name, "slot").inc()
                log.info("adapter %s left its slot", victim)
            slot = free[0]
            started = time.perf_counter()
            with self.bank_lock:
                self.bank.write(slot, loaded.weights)
            self.in_slots.put(key, slot)
            self.book.move(key, AdapterState.ACTIVE)
            log.debug("adapter %s into slot %d in %.2f ms", key, slot, (time.perf_counter() - started) * 1000)
            self._evict_from_memory()
            return slot

    def forget(self, key: str) -> bool:
        """Drop the residency record of an adapter that is not in memory (`unload` it first), so that nothing of it
        stays behind: for an import that was refused. False if its weights are still in memory."""
        with self.lock:
            if key in self.in_memory:
                return False
            self.book.forget(key)
            return True

    def unload(self, key: str) -> bool:
        """Drop an adapter from memory (slot and weights); False if it was not loaded or a request uses it. Call
        it between two forward passes (the scheduler's thread)."""
        with self.lock:
            if key not in self.in_memory:
                return False
            if any(used == key for used, _ in self.rows_in_use()):
                return False
            slot = self.in_slots.pop(key)
            if slot is not None:
                with self.bank_lock:
                    self.bank.clear(slot)
            self.in_memory.pop(key)
            self.book.move(key, AdapterState.ON_DISK)
            return True
