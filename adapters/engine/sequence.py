"""One request in flight: its prompt, sampling parameters and stop conditions, the tokens it produced,
and the channel its results go back on (events a caller waits on or streams)."""

from __future__ import annotations

import contextlib
import functools
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
from adapters.engine.grammar import OutputGrammar


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # OpenAI's penalties over the tokens generated so far: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # The transformers/vLLM one over the prompt and the generated tokens: a seen token's positive logit is divided
    # by it, a negative one multiplied (1 = off).
    repetition_penalty: float = 1.0
    # token id -> added to its logit before sampling (OpenAI's logit_bias).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # None: no logprobs; k >= 0: each generated token's logprob and the k most likely alternatives.
    logprobs: int | None = None
    # Benchmarks: always produce max_tokens (as vLLM's ignore_eos), so compared runs do the same work.
    ignore_eos: bool = False
    # Structured output (response_format): only tokens that keep the text valid JSON of the schema; the row ends
    # when the document is complete.
    grammar: OutputGrammar | None = None

    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the logits it was chosen from (see `adjusted_logits`), and the
    most likely alternatives there, as (token id, logprob), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the params asked for them


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
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.logprobs_sent = 0  # entries of logprobs already sent with a delta
        self._chosen: TokenLogprob | None = None  # the logprob of the token `pick` chose, until `accept` takes it
        self._counts: torch.Tensor | None = None  # generated tokens, per vocabulary id (the OpenAI penalties)
        self._seen: torch.Tensor | None = None  # prompt and generated tokens (the repetition penalty)
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        self.matcher = params.grammar.matcher() if params.grammar is not None else None

    def cancel(self) -> None:
        self.cancelled.set()

    def adjusted_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's logits with its penalties and logit_bias applied: what it samples from (after its temperature
        and top_p) and what its logprobs are the log-softmax of. O(vocabulary) per step, whatever the history."""
        params = self.params
        if not params.adjusts_logits():
            return logits
        logits = logits.float().clone()
        vocab = logits.shape[-1]
        if params.repetition_penalty != 1.0:
            if self._seen is None:
                self._seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                self._seen[torch.tensor(self.prompt_ids + self.produced, device=logits.device)] = True
            seen = logits[self._seen]
            logits[self._seen] = torch.where(seen > 0, seen / params.repetition_penalty,
                                             seen * params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:
            if self._counts is None:
                self._counts = torch.zeros(vocab, dtype=torch.float32, device=logits.device)
                for token in self.produced:
                    self._counts[token] += 1
            logits -= params.frequency_penalty * self._counts + params.presence_penalty * (self._counts > 0)
        if params.logit_bias:
            if self._bias is None:
                ids = [token for token in params.logit_bias if 0 <= token < vocab]
                self._bias = (torch.tensor(ids, dtype=torch.long, device=logits.device),
                              torch.tensor([params.logit_bias[t] for t in ids], dtype=torch.float32,
                                           device=logits.device))
            logits.index_add_(0, *self._bias)
        return logits

    def pick(self, logits: torch.Tensor) -> int:
        """Choose the next token from this row's last-position logits (penalties, bias, temperature, top_p), and
        note its logprob when asked for. With a grammar, only the tokens it allows can be chosen, and the logprobs
        are over those."""
        logits = self.adjusted_logits(logits)
        if self.matcher is not None:
            try:
                logits = self.matcher.mask(logits)
            except RuntimeError as exc:  # the grammar broke (never by the model's choice): this row alone ends
                self.fail(exc)
                return 0
        token = sample(logits, self.params, self.generator)
        if self.logprobs is not None:
            self._chosen = token_logprob(logits, token, self.params.logprobs or 0)
        return token

    def accept(self, token: int, eos_ids: set[int]) -> None:
        """Record a sampled token, decide whether the sequence is done, and stream the new text."""
        if self.finish_reason is not None:  # failed while picking
            return
        self._time_token()
        chosen, self._chosen = self._chosen, None
        if self.matcher is not None:
            self.matcher.consume(token)
        if token in eos_ids and not self.params.ignore_eos:
            self.finish("stop")
            return
        self.produced.append(token)
        if self._counts is not None:
            self._counts[token] += 1
        if self._seen is not None:
            self._seen[token] = True
        if self.logprobs is not None and chosen is not None:
            self.logprobs.append(chosen)
        metrics.GENERATED_TOKENS.labels(self.base_model).inc()
        self.text = self.tokenizer.decode(self.produced, skip_special_tokens=True)
        if self.params.stop:
            cut = first_stop(self.text, self.params.stop)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish("stop")
                return
        if self.matcher is not None and self.matcher.complete():
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
            if self.logprobs is not None:
                # The logprobs of the tokens produced so far go just before the text they made.
                self._put("logprobs", self.logprobs[self.logprobs_sent:])
                self.logprobs_sent = len(self.logprobs)
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
                                     prompt_tokens=len(self.prompt_ids),
                                     logprobs=list(self.logprobs) if self.logprobs is not None else None))

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
            elif kind == "error":
                raise value


def first_stop(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's symbol -> byte table (GPT-2's: printable bytes stand for themselves, the others are
    shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table = {chr(byte): byte for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


def token_text(tokenizer: Any, token: int) -> tuple[str, list[int]]:
    """A token's text and its UTF-8 bytes (OpenAI's `token` and `bytes`). A token that holds part of a character
    decodes to U+FFFD; its bytes are then its own: from a byte-level BPE symbol, or a `<0xNN>` byte-fallback one."""
    text = tokenizer.decode([token])
    if "\ufffd" in text:
        symbol = tokenizer.convert_ids_to_tokens(token)
        if isinstance(symbol, str):
            if len(symbol) == 6 and symbol.startswith("<0x") and symbol.endswith(">"):
                with contextlib.suppress(ValueError):
                    return text, [int(symbol[3:5], 16)]
            decoder = _byte_level_decoder()
            if symbol and all(char in decoder for char in symbol):
                return text, [decoder[char] for char in symbol]
    return text, list(text.encode("utf-8"))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-softmax over `logits` and the `top` most likely tokens' (float32)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        # A token masked out (a grammar, a -100 bias) is no alternative: it could not have been chosen.
        alternatives = [(i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if v != float("-inf")]
    return TokenLogprob(token=token, logprob=float(logprobs[token]), top=alternatives)


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
