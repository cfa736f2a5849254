"""Base-model tokenizers in the API process: each loaded once, warmed when the API starts, never on a request.

Uploads count tokens with the default base model's tokenizer. Importing transformers and loading a
tokenizer takes seconds on a slow CPU, so `start_warm_up` does both in a thread at start-up, `/ready`
reports when it is done, and a request that arrives earlier waits for that load instead of starting
a second one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from app.settings import Settings

log = logging.getLogger("adaptery")

_tokenizers: dict[str, Any] = {}
# Held while a tokenizer loads: a second caller waits for the first load instead of repeating it.
_load_lock = threading.Lock()


def for_model(settings: Settings, model_id: str) -> Any:
    """The tokenizer of a registered base model, loaded once per process."""
    from app.services import base_models

    with _load_lock:
        if model_id not in _tokenizers:
            spec = base_models.resolve(settings, model_id)
            _tokenizers[model_id] = base_models.load_tokenizer(settings, spec)
        return _tokenizers[model_id]


def load_unregistered(path: str) -> Any:
    """A tokenizer from a folder no registered model uses yet (a registration's check), not kept. Loaded under the
    warm-up's lock: a first import of transformers racing another thread's fails with a half-made module."""
    from adapters.base_models import load_tokenizer

    with _load_lock:
        return load_tokenizer(path)


def default(settings: Settings) -> Any:
    return for_model(settings, settings.default_base_model)


@dataclass
class WarmUp:
    """What the start-up warm-up has done so far (read by /ready)."""

    done: threading.Event = field(default_factory=threading.Event)
    seconds: float | None = None
    error: str | None = None
    # Base models other than the default whose tokenizer could not be loaded (uploads do not need them).
    skipped: dict[str, str] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        if not self.done.is_set():
            return {"ok": False, "state": "warming_up"}
        report: dict[str, Any] = {"ok": self.error is None, "seconds": self.seconds}
        if self.error:
            report["error"] = self.error
        if self.skipped:
            report["skipped"] = self.skipped
        return report


warm_up = WarmUp()


def start_warm_up(settings: Settings) -> threading.Thread:
    """In a background thread: the default base model's tokenizer (what uploads need; `done` after it),
    then, best effort, every other configured base model's."""

    def run() -> None:
        started = time.perf_counter()
        try:
            default(settings)
        except Exception as exc:  # reported by /ready; uploads will say the same when they try
            log.exception("warm-up: the default base model's tokenizer did not load")
            warm_up.error = f"{type(exc).__name__}: {exc}"[:500]
        warm_up.seconds = round(time.perf_counter() - started, 2)
        warm_up.done.set()
        log.info("warm-up done in %.1f s", warm_up.seconds)
        for model_id in settings.base_models:
            if model_id == settings.default_base_model:
                continue
            try:
                for_model(settings, model_id)
            except Exception as exc:  # e.g. a hub id on a machine without internet
                warm_up.skipped[model_id] = f"{type(exc).__name__}: {exc}"[:300]

    thread = threading.Thread(target=run, daemon=True, name="adaptery-warm-up")
    thread.start()
    return thread
