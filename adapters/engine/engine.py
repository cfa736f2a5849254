"""The serving engine: one runtime (model, slots, scheduler) per base model, created on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from adapters.engine.scheduler import BaseRuntime


class InferenceEngine:
    """Base runtimes by base-model id, created on first use."""

    def __init__(self, *, load_base: Callable[[str], tuple[Any, Any]], cache_size: int, max_rank: int,
                 cpu_cache_size: int = 0, max_batch: int = 32, slot_wait_seconds: float = 30.0,
                 cpu_cache_bytes: int | None = None):
        self._load_base = load_base
        self._options = {"cache_size": cache_size, "max_rank": max_rank, "cpu_cache_size": cpu_cache_size,
                         "cpu_cache_bytes": cpu_cache_bytes,
                         "max_batch": max_batch, "slot_wait_seconds": slot_wait_seconds}
        self._runtimes: dict[str, BaseRuntime] = {}
        self._lock = threading.Lock()

    def runtime(self, base_model: str) -> BaseRuntime:
        with self._lock:
            runtime = self._runtimes.get(base_model)
            if runtime is None:
                model, tokenizer = self._load_base(base_model)
                runtime = BaseRuntime(model, tokenizer, name=base_model, **self._options)  # type: ignore[arg-type]
                self._runtimes[base_model] = runtime
            return runtime

    def runtimes(self) -> dict[str, BaseRuntime]:
        """Every runtime this process has started, by base model."""
        with self._lock:
            return dict(self._runtimes)

    def loaded_runtime(self, base_model: str) -> BaseRuntime | None:
        """The runtime of a base model if this process has loaded it (never loads one)."""
        return self._runtimes.get(base_model)
