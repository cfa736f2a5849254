"""One request in flight: its prompt, sampling parameters and stop conditions, the tokens it produced,
and the channel its results go back on (events a caller waits on or streams)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters import serving_metrics as metrics
from adapters.engine.adapter_loader import LoadedAdapter


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Benchmarks: always produce max_tokens (as vLLM's ignore_eos), so compared runs do the same work.
    ignore_eos: bool = False


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int


class Sequence:
    """One request in flight: its prompt, adapter, sampling state, and the channel back to the caller."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], adapter: LoadedAdapter | None, params: SamplingParams,
                 tokenizer: Any, *, device: torch.device | str = "cpu", record_logits: bool = False,
                 base_model: str = "", tenant: str | None = None):
        self.id = next(self._ids)
        self.base_model = base_model  # the metrics' label
        self.tenant = tenant  # whose request: the scheduler admits waiting requests fairly across tenants
        self.submitted_at = time.perf_counter()
        self.last_token_at: float | None = None
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.params = params
        self.tokenizer = tokenizer
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % (2**63)))
        self.produced: list[int] = []
        self.length = 0  # KV entries for this row (an adapter's prefix or virtual tokens included)
        self.slot = 0
        self.slot_refused_at: float | None = None  # when the scheduler first found no slot for its adapter
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        # Called (from the scheduler thread) after each event; an asyncio caller uses it to wake up.
        self.notify: Callable[[], None] | None = None
        self.logits: list[torch.Tensor] | None = [] if record_logits else None

    def cancel(self) -> None:
        self.cancelled.set()

    def accept(self, token: int, eos_ids: set[int]) -> None:
        """Record a sampled token, decide whether the sequence is done, and stream the new text."""
        self._time_token()
        if token in eos_ids and not self.params.ignore_eos:
            self.finish("stop")
            return
        self.produced.append(token)
        metrics.GENERATED_TOKENS.labels(self.base_model).inc()
        self.text = self.tokenizer.decode(self.produced, skip_special_tokens=True)
        if self.params.stop:
            cut = first_stop(self.text, self.params.stop)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish("stop")
                return
        if len(self.produced) >= self.params.max_tokens:
            self.finish("length")
            return
        self._stream(final=False)

    def _time_token(self) -> None:
        moment = time.perf_counter()
        if self.last_token_at is None:
            metrics.TIME_TO_FIRST_TOKEN.labels(self.base_model).observe(moment - self.submitted_at)
        else:
            metrics.INTER_TOKEN_LATENCY.labels(self.base_model).observe(moment - self.last_token_at)
        self.last_token_at = moment

    def _stream(self, final: bool) -> None:
        # Hold back a partly decoded character and anything that may still become a stop string.
        hold = 0 if final else max((len(s) - 1 for s in self.params.stop), default=0)
        end = len(self.text) - hold
        if not final and self.text.endswith("\ufffd"):
            end = min(end, len(self.text) - 1)
        if end > self.sent:
            self._put("delta", self.text[self.sent:end])
            self.sent = end

    def _put(self, kind: str, value: Any) -> None:
        self.events.put((kind, value))
        if self.notify is not None:
            self.notify()

    def finish(self, reason: str) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        self._stream(final=True)
        self._put("done", Generation(text=self.text, token_ids=list(self.produced), finish_reason=reason,
                                     prompt_tokens=len(self.prompt_ids)))

    def fail(self, error: Exception) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self._put("error", error)

    def wait(self) -> Generation:
        while True:
            kind, value = self.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value

    def stream(self) -> Iterator[str]:
        """Text deltas as they are produced; the final Generation is the StopIteration value."""
        while True:
            kind, value = self.events.get()
            if kind == "delta":
                yield value
            elif kind == "done":
                return value
            else:
                raise value


def first_stop(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest set whose mass reaches top_p (always at least the most likely token).
        keep = cumulative - sorted_probs < params.top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
