"""The serving engine: one copy of each base model in memory, many adapters, continuous batching.

A scheduler thread per base model runs the decode loop. Requests that arrive together are prefilled
together (one left-padded forward pass, logits for the last position only) and join the running batch
at the next step boundary; each row keeps its own adapter, sampling
parameters and stop conditions, and leaves the batch as soon as it finishes. LoRA and AdaLoRA rows
share one forward pass through the slot bank (lora_layers); prefix-tuning rows carry their prefix in
their own KV rows, so they batch with everything else too.

Every forward pass runs on the scheduler thread (`call` hands other work to it): with OpenMP, a second
thread running torch kernels in the same process gives both thread teams throttled spin-waits, and
each small kernel then pays a thread wake-up (measured: a decode step 40% slower).

Adapter tiers: active (in a slot), cpu (weights loaded, no slot), on_disk. Loading from disk happens
in the caller's thread, so a slow disk never stalls the batch; moving into a slot is an in-place copy,
made on the scheduler thread between two steps.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adapters.engine.adapter_loader import AdapterLoadError, LoadedAdapter, load_adapter
from adapters.engine.lora_layers import LoraBank

log = logging.getLogger("adaptery.engine")

# Padded tokens (rows × longest prompt) per batched prefill pass: bounds its activation memory.
PREFILL_TOKENS = 8192


def on_scheduler_thread(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a BaseRuntime method on its scheduler thread, whichever thread calls it (see `call`)."""

    @functools.wraps(method)
    def wrapper(self: BaseRuntime, *args: Any, **kwargs: Any) -> Any:
        return self.call(lambda: method(self, *args, **kwargs))

    return wrapper


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


@dataclass
class AdapterRef:
    """Where to find an adapter: a stable key (its id), its folder, and the base model it needs."""

    key: str
    folder: Path
    base_model: str
    method: str | None = None


@dataclass
class Residency:
    """What a serving process knows about one adapter it has seen."""

    key: str
    state: str  # "on_disk" | "cpu" | "active" | "failed"
    pinned: bool = False
    last_used_at: float | None = None
    load_ms: float | None = None
    rank: int | None = None
    method: str | None = None
    size_bytes: int | None = None
    error: str | None = None


class Sequence:
    """One request in flight: its prompt, adapter, sampling state, and the channel back to the caller."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], adapter: LoadedAdapter | None, params: SamplingParams,
                 tokenizer: Any, *, device: torch.device | str = "cpu", record_logits: bool = False):
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.params = params
        self.tokenizer = tokenizer
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % (2**63)))
        self.produced: list[int] = []
        self.length = 0  # KV entries for this row (prefix tokens included)
        self.slot = 0
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        # Called (from the scheduler thread) after each event; an asyncio caller uses it to wake up.
        self.notify: Callable[[], None] | None = None
        self.logits: list[torch.Tensor] | None = [] if record_logits else None

    @property
    def prefix(self) -> int:
        return self.adapter.num_virtual_tokens if self.adapter is not None and self.adapter.kind == "prefix" else 0

    def cancel(self) -> None:
        self.cancelled.set()

    def accept(self, token: int, eos_ids: set[int]) -> None:
        """Record a sampled token, decide whether the sequence is done, and stream the new text."""
        if token in eos_ids and not self.params.ignore_eos:
            self.finish("stop")
            return
        self.produced.append(token)
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


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends each step's keys/values into spare capacity instead of concatenating.

    DynamicLayer copies the whole cache on every step (torch.cat); here a step writes one column and the
    layer exposes a view of the filled part. Capacity doubles when it runs out.
    """

    def install(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
        self.lazy_initialization(keys, values)
        self._keys = self._with_room(keys, keys.shape[2] + spare)
        self._values = self._with_room(values, values.shape[2] + spare)
        self.keys, self.values = self._keys[:, :, : keys.shape[2]], self._values[:, :, : values.shape[2]]

    @staticmethod
    def _with_room(t: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3])
        buffer[:, :, : t.shape[2]].copy_(t)
        return buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys, self.values
        assert keys is not None and values is not None, "install() first"
        length, new = keys.shape[2], key_states.shape[2]
        if length + new > self._keys.shape[2]:
            capacity = 2 * (length + new)
            self._keys, self._values = self._with_room(keys, capacity), self._with_room(values, capacity)
        self._keys[:, :, length: length + new].copy_(key_states)
        self._values[:, :, length: length + new].copy_(value_states)
        self.keys, self.values = self._keys[:, :, : length + new], self._values[:, :, : length + new]
        return self.keys, self.values


class BatchCache:
    """The running batch's KV cache: per layer [rows, kv_heads, length, head_dim], left-padded.

    The same cache object serves step after step (the model appends to it in place, see GrowingLayer);
    it is rebuilt only when rows join or leave.
    """

    SPARE = 64  # columns of room for the next decode steps

    def __init__(self, config: Any):
        self.config = config
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [rows, length], 1 for real entries
        self._cache: Any = None

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def as_dynamic_cache(self) -> Any:
        if self._cache is None:
            cache = DynamicCache(config=self.config)
            for index, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
                layer = GrowingLayer()
                layer.install(k, v, self.SPARE)
                cache.layers[index] = layer
            self._cache = cache
        return self._cache

    def absorb(self, cache: Any) -> None:
        """Take the tensors back from the DynamicCache after a forward step appended to it."""
        self._cache = cache
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor | None = None) -> None:
        """Append rows ([n, kv_heads, len, head_dim] per layer, `mask` [n, len] marking real entries;
        all real when None), padding on the left."""
        self._cache = None
        new_len = keys[0].shape[2]
        new_mask = mask if mask is not None else torch.ones(keys[0].shape[0], new_len, dtype=torch.long,
                                                            device=keys[0].device)
        if self.mask is None:
            self.keys, self.values, self.mask = list(keys), list(values), new_mask
            return
        length = self.mask.shape[1]
        width = max(length, new_len)

        def pad(t: torch.Tensor, to: int) -> torch.Tensor:
            if t.shape[2] == to:
                return t
            return torch.cat([t.new_zeros(t.shape[0], t.shape[1], to - t.shape[2], t.shape[3]), t], dim=2)

        def pad_mask(m: torch.Tensor, to: int) -> torch.Tensor:
            return m if m.shape[1] == to else torch.cat([m.new_zeros(m.shape[0], to - m.shape[1]), m], dim=1)

        self.keys = [torch.cat([pad(a, width), pad(b, width)]) for a, b in zip(self.keys, keys, strict=True)]
        self.values = [torch.cat([pad(a, width), pad(b, width)]) for a, b in zip(self.values, values, strict=True)]
        self.mask = torch.cat([pad_mask(self.mask, width), pad_mask(new_mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, and drop leading columns that are padding in every remaining row."""
        self._cache = None
        if not rows:
            self.keys, self.values, self.mask = [], [], None
            return
        assert self.mask is not None
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = mask[:, start:]
        self.keys = [k.index_select(0, index)[:, :, start:] for k in self.keys]
        self.values = [v.index_select(0, index)[:, :, start:] for v in self.values]


class BaseRuntime:
    """One loaded base model with its tokenizer, adapter slots, adapter cache and scheduler thread."""

    def __init__(self, model: Any, tokenizer: Any, *, cache_size: int, max_rank: int, cpu_cache_size: int = 0,
                 max_batch: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.max_rank = max_rank
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.cache_size = cache_size
        self.cpu_cache_size = max(cpu_cache_size, cache_size)
        self.loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # cpu tier, LRU order
        self.slot_of: dict[str, int] = {}  # active tier
        self.residency: dict[str, Residency] = {}
        self.eos_ids = self._eos_ids()
        self.lock = threading.RLock()  # adapters, slots and residency
        self.model_lock = threading.Lock()  # one forward pass at a time
        self.wakeup = threading.Condition(self.lock)
        self.pending: list[Sequence] = []
        self.active: list[Sequence] = []
        self.calls: list[tuple[Callable[[], Any], Future[Any]]] = []  # work for the scheduler thread
        self.batch = BatchCache(model.config)
        self.stopping = False
        self.scheduler = threading.Thread(target=self._run, name="adaptery-scheduler", daemon=True)
        self.scheduler.start()
        suffixes = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n != "lm_head"}
        # Allocated on the scheduler thread: filling the slot tensors is this process's first parallel torch work.
        self.bank: LoraBank = self.call(lambda: LoraBank(model, suffixes, n_slots=cache_size))
        # A daemon thread still inside torch when the interpreter exits aborts the process.
        atexit.register(self.close)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ------------------------------------------------------------ adapter tiers

    @property
    def adapters(self) -> OrderedDict[str, LoadedAdapter]:
        """Adapters whose weights are in memory (cpu or active), least recently used first."""
        return self.loaded

    def ensure_adapter(self, ref: AdapterRef) -> LoadedAdapter:
        """The adapter's weights in memory (from disk if needed), checked against this base model."""
        with self.lock:
            loaded = self.loaded.get(ref.key)
            if loaded is not None:
                self.loaded.move_to_end(ref.key)
                self._touch(ref.key)
                return loaded
        try:
            loaded = load_adapter(ref.folder, key=ref.key, model_config=self.model.config, max_rank=self.max_rank,
                                  device=self.device)
            if loaded.kind == "lora":
                self.bank.check(loaded.lora)
        except (KeyError, ValueError, OSError) as exc:
            error = exc if isinstance(exc, AdapterLoadError) else AdapterLoadError(
                f"adapter {ref.key} could not be loaded: {exc}")
            with self.lock:
                self.residency[ref.key] = Residency(key=ref.key, state="failed", method=ref.method, error=str(error))
            raise error from exc
        with self.lock:
            if ref.key not in self.loaded:
                self.loaded[ref.key] = loaded
                state = self.residency.get(ref.key)
                self.residency[ref.key] = Residency(
                    key=ref.key, state="cpu", pinned=bool(state and state.pinned), load_ms=round(loaded.load_ms, 3),
                    rank=loaded.rank, method=ref.method or loaded.peft_type.lower(), size_bytes=loaded.size_bytes)
                self._evict_cpu()
            self._touch(ref.key)
            return self.loaded[ref.key]

    def _touch(self, key: str) -> None:
        if key in self.residency:
            self.residency[key].last_used_at = time.time()

    def _evict_cpu(self) -> None:
        for key in list(self.loaded):
            if len(self.loaded) <= self.cpu_cache_size:
                return
            if key in self.slot_of or self.residency[key].pinned:
                continue
            del self.loaded[key]
            self.residency[key].state = "on_disk"

    @on_scheduler_thread
    def activate(self, adapter: LoadedAdapter | str) -> int:
        """Give a loaded adapter a slot (copying it in) and return the slot; -1 when none is free now."""
        with self.lock:
            if isinstance(adapter, str):
                adapter = self.loaded[adapter]
            key, loaded = adapter.key, adapter
            if key not in self.loaded:  # its weights left the cpu tier while the request waited
                self.loaded[key] = loaded
                self.residency[key].state = "cpu"
            self.loaded.move_to_end(key)
            if loaded.kind != "lora":
                return 0
            if key in self.slot_of:
                return self.slot_of[key]
            busy = {s.slot for s in self.active} | {s.slot for s in self.pending if s.slot}
            free = [s for s in range(1, self.bank.n_slots) if s not in self.slot_of.values()]
            if not free:
                victims = [k for k, s in self.slot_of.items()
                           if s not in busy and not self.residency[k].pinned]
                if not victims:
                    return -1
                victim = min(victims, key=lambda k: self.residency[k].last_used_at or 0)
                free = [self.slot_of.pop(victim)]
                self.residency[victim].state = "cpu"
                log.info("adapter %s left its slot", victim)
            slot = free[0]
            started = time.perf_counter()
            with self.model_lock:
                self.bank.write(slot, loaded.lora)
            self.slot_of[key] = slot
            self.residency[key].state = "active"
            log.debug("adapter %s into slot %d in %.2f ms", key, slot, (time.perf_counter() - started) * 1000)
            self._evict_cpu()
            return slot

    @on_scheduler_thread
    def unload(self, key: str) -> bool:
        """Drop an adapter from memory (slot and weights); False if it was not loaded or is in use."""
        with self.lock:
            if key not in self.loaded:
                return False
            slot = self.slot_of.get(key)
            if slot is not None and any(s.slot == slot for s in self.active + self.pending):
                return False
            if slot is not None:
                with self.model_lock:
                    self.bank.clear(slot)
                del self.slot_of[key]
            del self.loaded[key]
            self.residency[key].state = "on_disk"
            return True

    def pin(self, key: str, pinned: bool) -> None:
        with self.lock:
            if key in self.residency:
                self.residency[key].pinned = pinned

    # ------------------------------------------------------------ requests

    def submit(self, prompt_ids: list[int], adapter: LoadedAdapter | None, params: SamplingParams, *,
               record_logits: bool = False) -> Sequence:
        sequence = Sequence(prompt_ids, adapter, params, self.tokenizer, device=self.device,
                            record_logits=record_logits)
        with self.wakeup:
            self.pending.append(sequence)
            self.wakeup.notify()
        return sequence

    def generate(self, input_ids: list[int], adapter: LoadedAdapter | None, params: SamplingParams) -> Generation:
        return self.submit(input_ids, adapter, params).wait()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the scheduler thread between two decode steps and return its result."""
        if threading.current_thread() is self.scheduler:
            return fn()
        future: Future[Any] = Future()
        with self.wakeup:
            if self.stopping:
                raise RuntimeError("the serving engine stopped")
            self.calls.append((fn, future))
            self.wakeup.notify()
        return future.result()

    @on_scheduler_thread
    @torch.inference_mode()
    def logits(self, input_ids: list[int], adapter: LoadedAdapter | None) -> torch.Tensor:
        """Logits for every position of one sequence, outside the batch (tests, import smoke test)."""
        slot = self.activate(adapter) if adapter is not None and adapter.kind == "lora" else 0
        with self.model_lock:
            cache = self._prefix_cache(adapter)
            prefix = adapter.num_virtual_tokens if adapter is not None and adapter.kind == "prefix" else 0
            mask = torch.ones(1, prefix + len(input_ids), dtype=torch.long, device=self.device)
            with self.bank.route([max(slot, 0)]):
                out = self.model(input_ids=torch.tensor([input_ids], device=self.device), attention_mask=mask,
                                 past_key_values=cache, use_cache=True)
            return out.logits[0]

    def close(self) -> None:
        """Stop the scheduler thread (requests still queued are failed)."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if threading.current_thread() is not self.scheduler:
            self.scheduler.join(timeout=30)
        for sequence in self.pending + self.active:
            sequence.fail(RuntimeError("the serving engine stopped"))
        for _fn, future in self.calls:
            future.set_exception(RuntimeError("the serving engine stopped"))

    # ------------------------------------------------------------ the scheduler

    def _prefix_cache(self, adapter: LoadedAdapter | None) -> Any:
        cache = DynamicCache(config=self.model.config)
        if adapter is not None and adapter.kind == "prefix":
            positions = torch.arange(adapter.num_virtual_tokens, device=self.device)
            for layer, (k, v) in enumerate(adapter.prefix):
                cache.update(k.unsqueeze(0), v.unsqueeze(0), layer, cache_kwargs={"cache_position": positions})
        return cache

    def _run(self) -> None:
        while True:
            with self.wakeup:
                while not self.stopping and not self.active and not self.calls and not self._admissible():
                    self.wakeup.wait(timeout=1.0)
                if self.stopping:
                    return
                calls, self.calls = self.calls, []
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except Exception as exc:  # the caller gets it
                    future.set_exception(exc)
            try:
                self._admit()
                if self.active:
                    self._step()
            except Exception as exc:  # a broken step fails the requests in it, never the thread
                log.exception("scheduler step failed")
                for sequence in self.active:
                    sequence.fail(exc)
                self.active = []
                self.batch = BatchCache(self.model.config)

    def _admissible(self) -> bool:
        return bool(self.pending) and len(self.active) < self.max_batch

    def _admit(self) -> None:
        with self.lock:
            waiting = list(self.pending)
        before = len(self.active)
        self._admit_waiting(waiting)
        if len(self.active) != before:
            # Rows sorted by slot let a batch of distinct adapters read consecutive slots as views.
            order = sorted(range(len(self.active)), key=lambda i: self.active[i].slot)
            if order != list(range(len(self.active))):
                self.active = [self.active[i] for i in order]
                self.batch.keep(order)

    def _admit_waiting(self, waiting: list[Sequence]) -> None:
        together: list[Sequence] = []  # prefilled in one forward pass
        for sequence in waiting:
            if len(self.active) + len(together) >= self.max_batch:
                break
            if sequence.cancelled.is_set():
                self._dequeue(sequence)
                sequence.finish("cancelled")
                continue
            if sequence.adapter is not None and sequence.adapter.kind == "lora":
                slot = self.activate(sequence.adapter)
                if slot < 0:
                    continue  # every slot is serving a running request; try again next step
                sequence.slot = slot
            self._dequeue(sequence)
            if sequence.prefix:
                self._prefill_each([sequence])  # its prefix lives in its own KV rows: prefilled alone
            else:
                together.append(sequence)
        group: list[Sequence] = []
        longest = 0
        for sequence in together:
            longest = max(longest, len(sequence.prompt_ids))
            if group and (len(group) + 1) * longest > PREFILL_TOKENS:
                self._prefill_group(group)
                group, longest = [], len(sequence.prompt_ids)
            group.append(sequence)
        if group:
            self._prefill_group(group)

    def _prefill_group(self, group: list[Sequence]) -> None:
        try:
            self._prefill(group)
        except Exception as exc:  # retry one by one, so one bad request cannot fail the others
            log.exception("batched prefill failed; prefilling its %d requests one by one", len(group))
            for sequence in group:  # a row that already sampled its first token must not sample it again
                if sequence.produced or sequence.finish_reason is not None:
                    sequence.fail(exc)
            self._prefill_each([s for s in group if s.finish_reason is None])

    def _prefill_each(self, group: list[Sequence]) -> None:
        for sequence in group:
            try:
                self._prefill([sequence])
            except Exception as exc:  # one bad request must not take the batch down
                log.exception("prefill failed")
                sequence.fail(exc)

    def _dequeue(self, sequence: Sequence) -> None:
        with self.lock:
            self.pending.remove(sequence)

    @torch.inference_mode()
    def _prefill(self, group: list[Sequence]) -> None:
        """Run the prompts of `group` through the model in one left-padded pass (a prefix-tuning request
        always comes alone), sample each row's first token and add the rows still going to the batch."""
        prefix = group[0].prefix
        width = max(len(s.prompt_ids) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), prefix + width, dtype=torch.long)
        for row, sequence in enumerate(group):
            ids[row, width - len(sequence.prompt_ids):] = torch.tensor(sequence.prompt_ids)
            mask[row, prefix + width - len(sequence.prompt_ids):] = 1
            mask[row, :prefix] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix:]
        record = any(s.logits is not None for s in group)
        with self.model_lock:
            cache = self._prefix_cache(group[0].adapter)
            with self.bank.route([s.slot for s in group]):
                # Only the last position's logits are needed to sample; the lm_head over every prompt
                # position would cost as much as the rest of a short prompt's prefill.
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                 use_cache=True, logits_to_keep=0 if record else 1)
        keep = []
        for row, sequence in enumerate(group):
            if sequence.logits is not None:
                sequence.logits.append(out.logits[row, width - len(sequence.prompt_ids):].clone())
            sequence.length = prefix + len(sequence.prompt_ids)
            sequence.accept(sample(out.logits[row, -1], sequence.params, sequence.generator), self.eos_ids)
            if sequence.finish_reason is None:
                keep.append(row)
        if not keep:
            return
        layers = out.past_key_values.layers
        index = torch.tensor(keep, device=self.device)
        self.batch.add([layer.keys.index_select(0, index) for layer in layers],
                       [layer.values.index_select(0, index) for layer in layers], mask.index_select(0, index))
        self.active.extend(group[i] for i in keep)

    @torch.inference_mode()
    def _step(self) -> None:
        rows = self.active
        assert self.batch.mask is not None
        last = torch.tensor([[s.produced[-1]] for s in rows], device=self.device)
        positions = torch.tensor([[s.length] for s in rows], device=self.device)
        mask = torch.cat([self.batch.mask, self.batch.mask.new_ones(len(rows), 1)], dim=1)
        with self.model_lock:
            cache = self.batch.as_dynamic_cache()
            with self.bank.route([s.slot for s in rows]):
                out = self.model(input_ids=last, attention_mask=mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True)
        self.batch.absorb(out.past_key_values)
        self.batch.mask = mask
        keep = []
        for row, sequence in enumerate(rows):
            sequence.length += 1
            if sequence.logits is not None:
                sequence.logits.append(out.logits[row, -1:].clone())
            if sequence.cancelled.is_set():
                sequence.finish("cancelled")
            else:
                sequence.accept(sample(out.logits[row, -1], sequence.params, sequence.generator), self.eos_ids)
            if sequence.finish_reason is None:
                keep.append(row)
        if len(keep) < len(rows):
            self.active = [rows[i] for i in keep]
            self.batch.keep(keep)


class InferenceEngine:
    """Base runtimes by base-model id, created on first use."""

    def __init__(self, *, load_base: Callable[[str], tuple[Any, Any]], cache_size: int, max_rank: int,
                 cpu_cache_size: int = 0, max_batch: int = 32):
        self._load_base = load_base
        self._options = {"cache_size": cache_size, "max_rank": max_rank, "cpu_cache_size": cpu_cache_size,
                         "max_batch": max_batch}
        self._runtimes: dict[str, BaseRuntime] = {}
        self._lock = threading.Lock()

    def runtime(self, base_model: str) -> BaseRuntime:
        with self._lock:
            runtime = self._runtimes.get(base_model)
            if runtime is None:
                model, tokenizer = self._load_base(base_model)
                runtime = BaseRuntime(model, tokenizer, **self._options)  # type: ignore[arg-type]
                self._runtimes[base_model] = runtime
            return runtime

    def loaded_bases(self) -> dict[str, BaseRuntime]:
        return dict(self._runtimes)
