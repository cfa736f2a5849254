"""One base model in memory and its scheduler thread: continuous batching over rows with different adapters.

Requests that arrive together are prefilled together (one left-padded forward pass, logits for the last
position only) and join the running batch at the next step boundary; each row keeps its own adapter,
sampling parameters and stop conditions, and leaves the batch as soon as it finishes. Every serving
kind shares the forward pass: slot kinds through the slot bank, virtual tokens as the first embeddings
of the row's prefill, a KV prefix as the first entries of the row's cache (prefilled alone, then batched).

Admission is fair across tenants: when more requests wait than the batch has rows free, the tenant with the
fewest requests running goes first (round robin by tenant, first come first served within a tenant), and a
request whose adapter finds no slot gives up after `slot_wait_seconds` (SlotUnavailable) instead of waiting for as
long as other requests hold the slots. Both run per admission, never per decode step of a running row.

Every forward pass runs on the scheduler thread (`call` hands other work to it): with OpenMP, a second
thread running torch kernels in the same process gives both thread teams throttled spin-waits, and
each small kernel then pays a thread wake-up (measured: a decode step 40% slower).

The adapters the runtime serves from are its AdapterCache's (adapter_cache.py: residency, the memory and
slot tiers, eviction); the scheduler tells it which adapters and slots its requests use. Loading from disk
happens in the caller's thread, so a slow disk never stalls the batch; moving into a slot is an in-place
copy, made on the scheduler thread between two steps.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from adapters import serving_metrics as metrics
from adapters.engine.adapter_cache import AdapterCache
from adapters.engine.adapter_loader import LoadedAdapter
from adapters.engine.application import kv_prefix_length, prefill_inputs, virtual_token_count
from adapters.engine.kv_cache import BatchCache
from adapters.engine.sequence import Generation, SamplingParams, Sequence
from adapters.engine.slot_bank import SlotBank, is_projection

log = logging.getLogger("adaptery.engine")

# Padded tokens (rows × longest prompt) per batched prefill pass: bounds its activation memory.
PREFILL_TOKENS = 8192


class SlotUnavailable(RuntimeError):
    """No adapter slot came free for a request within the runtime's slot wait: every slot is pinned or serving
    other requests. Worth retrying later (or on another replica)."""

    def __init__(self, message: str, *, wait_seconds: float):
        super().__init__(message)
        self.wait_seconds = wait_seconds


def on_scheduler_thread(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a BaseRuntime method on its scheduler thread, whichever thread calls it (see `call`)."""

    @functools.wraps(method)
    def wrapper(self: BaseRuntime, *args: Any, **kwargs: Any) -> Any:
        return self.call(lambda: method(self, *args, **kwargs))

    return wrapper


def _contiguous_input(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The output head's input copied into a tensor of its own. A prefill keeps the logits of the last position
    only: a slice [rows, 1, hidden] of the prompt's hidden states, whose strides still span the whole prompt, so
    the head computes it as a batched matmul; in bf16 on a CPU that first copies the whole transposed vocabulary
    matrix (140 ms for SmolLM2's, against 7 ms for the product). The copy costs rows x hidden values."""
    return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])


class BaseRuntime:
    """One loaded base model with its tokenizer, its adapters (`adapters`, an AdapterCache) and the scheduler
    thread that runs every forward pass: continuous batching over the requests (`submit`)."""

    def __init__(self, model: Any, tokenizer: Any, *, cache_size: int, max_rank: int, cpu_cache_size: int = 0,
                 max_batch: int = 32, slot_wait_seconds: float = 30.0, name: str = "",
                 cpu_cache_bytes: int | None = None):
        self.name = name  # the base model's id (the metrics' label)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.slot_wait_seconds = slot_wait_seconds
        self.device = next(model.parameters()).device
        self.eos_ids = self._eos_ids()
        self.lock = threading.RLock()  # the request queues, and the adapter cache
        self.model_lock = threading.Lock()  # one forward pass (or slot write) at a time
        self.wakeup = threading.Condition(self.lock)
        self.pending: list[Sequence] = []
        self.active: list[Sequence] = []
        self.calls: list[tuple[Callable[[], Any], Future[Any]]] = []  # work for the scheduler thread
        self.batch = BatchCache(model.config)
        self.stopping = False
        self.scheduler = threading.Thread(target=self._run, name="adaptery-scheduler", daemon=True)
        self.scheduler.start()
        head = model.get_output_embeddings()  # the output head is never an adapter's target
        # Removed in close(): the model may outlive this runtime (tests build several on one model).
        self._head_hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
        suffixes = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_projection(m) and m is not head}
        # Allocated on the scheduler thread: filling the slot tensors is this process's first parallel torch work.
        self.bank: SlotBank = self.call(lambda: SlotBank(model, suffixes, n_slots=cache_size))
        self.adapters = AdapterCache(model=model, bank=self.bank, max_rank=max_rank, cache_size=cache_size,
                                     cpu_cache_size=cpu_cache_size, cpu_cache_bytes=cpu_cache_bytes,
                                     rows_in_use=self._rows_in_use, lock=self.lock,
                                     bank_lock=self.model_lock, name=name)
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

    # ------------------------------------------------------------ what the adapter cache and services ask

    def _rows_in_use(self) -> list[tuple[str | None, int]]:
        """(adapter key or None, slot) of every request waiting or running: the adapter cache keeps those."""
        with self.lock:
            rows = self.active + self.pending
        return [(s.adapter.key if s.adapter is not None else None, s.slot) for s in rows]

    def requests_in_flight(self) -> dict[str, int]:
        """Requests waiting or generating, by adapter key ("base" for the base model alone)."""
        counts: dict[str, int] = {}
        for key, _ in self._rows_in_use():
            counts[key or "base"] = counts.get(key or "base", 0) + 1
        return counts

    @on_scheduler_thread
    def activate(self, adapter: LoadedAdapter | str) -> int:
        """AdapterCache.activate between two decode steps: its slot (0 for kinds that need none), -1 when every
        slot is serving a request or pinned."""
        return self.adapters.activate(adapter)

    @on_scheduler_thread
    def unload(self, key: str) -> bool:
        """AdapterCache.unload between two decode steps; False if it was not loaded or is in use."""
        return self.adapters.unload(key)

    # ------------------------------------------------------------ requests

    def submit(self, prompt_ids: list[int], adapter: LoadedAdapter | None, params: SamplingParams, *,
               record_logits: bool = False, tenant: str | None = None) -> Sequence:
        """Queue a request; `tenant` is whose it is (admission is fair across tenants)."""
        return self.submit_choices(prompt_ids, adapter, [params], record_logits=record_logits, tenant=tenant)[0]

    def submit_choices(self, prompt_ids: list[int], adapter: LoadedAdapter | None, params: list[SamplingParams], *,
                       record_logits: bool = False, tenant: str | None = None) -> list[Sequence]:
        """Queue one sequence per entry of `params` for the same prompt (a request's `n` choices). They are queued
        together, so they are admitted in one prefill pass that computes the shared prompt once."""
        sequences = [Sequence(prompt_ids, adapter, one, self.tokenizer, device=self.device,
                              record_logits=record_logits, base_model=self.name, tenant=tenant) for one in params]
        with self.wakeup:
            self.pending.extend(sequences)
            self.wakeup.notify()
        return sequences

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
        """Logits at every prompt position of one sequence, outside the batch (tests, import smoke test)."""
        slot = self.adapters.activate(adapter) if adapter is not None else 0
        weights = adapter.weights if adapter is not None else None
        inputs = prefill_inputs([input_ids], [weights], model=self.model, device=self.device)
        with self.model_lock, self.bank.route([max(slot, 0)]):
            out = self.model(**inputs.model_kwargs, use_cache=True)
        return out.logits[0, inputs.width - len(input_ids):]

    def close(self) -> None:
        """Stop the scheduler thread (requests still queued are failed)."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if threading.current_thread() is not self.scheduler:
            self.scheduler.join(timeout=30)
        for sequence in self.pending + self.active:
            sequence.fail(RuntimeError("the serving engine stopped"))
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None
        for _fn, future in self.calls:
            future.set_exception(RuntimeError("the serving engine stopped"))

    # ------------------------------------------------------------ the scheduler

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
        room = self.max_batch - len(self.active)
        if room <= 0 or not waiting:
            return
        if len(waiting) > room:  # who gets the free rows matters only when not everyone fits
            waiting = self._fair_order(waiting)
        before = len(self.active)
        self._admit_waiting(waiting)
        if len(self.active) != before:
            # Rows sorted by slot let a batch of distinct adapters read consecutive slots as views.
            order = sorted(range(len(self.active)), key=lambda i: self.active[i].slot)
            if order != list(range(len(self.active))):
                self.active = [self.active[i] for i in order]
                self.batch.keep(order)

    def _fair_order(self, waiting: list[Sequence]) -> list[Sequence]:
        """The waiting requests in the order to admit them: round robin by tenant, counting the rows each tenant
        already has running (so a tenant with a full batch of rows comes after one with none), and first come
        first served within a tenant and between equals. One tenant's burst therefore never delays another
        tenant's first request by more than one free row."""
        running: dict[str | None, int] = {}
        for sequence in self.active:
            running[sequence.tenant] = running.get(sequence.tenant, 0) + 1
        queued: dict[str | None, int] = {}
        ranked = []
        for arrival, sequence in enumerate(waiting):
            turn = running.get(sequence.tenant, 0) + queued.get(sequence.tenant, 0)
            queued[sequence.tenant] = queued.get(sequence.tenant, 0) + 1
            ranked.append((turn, arrival, sequence))
        ranked.sort(key=lambda entry: (entry[0], entry[1]))
        return [sequence for _, _, sequence in ranked]

    def _admit_waiting(self, waiting: list[Sequence]) -> None:
        together: list[Sequence] = []  # prefilled in one forward pass
        for sequence in waiting:
            if len(self.active) + len(together) >= self.max_batch:
                break
            if sequence.cancelled.is_set():
                self._dequeue(sequence)
                sequence.finish("cancelled")
                continue
            if sequence.adapter is not None and sequence.adapter.kind.uses_slot:
                slot = self.adapters.activate(sequence.adapter)
                if slot < 0:  # every slot is pinned or serving a running request: try again next step, a while
                    self._refused_a_slot(sequence)
                    continue
                sequence.slot = slot
            self._dequeue(sequence)
            if kv_prefix_length(self._weights(sequence)):
                self._prefill_each([sequence])  # its prefix lives in its own KV rows: prefilled alone
            else:
                together.append(sequence)
        group: list[Sequence] = []
        longest = 0
        for sequence in together:
            length = len(sequence.prompt_ids) + virtual_token_count(self._weights(sequence))
            longest = max(longest, length)
            if group and (len(group) + 1) * longest > PREFILL_TOKENS:
                self._prefill_group(group)
                group, longest = [], length
            group.append(sequence)
        if group:
            self._prefill_group(group)

    def _refused_a_slot(self, sequence: Sequence) -> None:
        """A request found no slot for its adapter: it keeps waiting for one up to `slot_wait_seconds` (slots free
        as running rows end), then fails, so a full slot bank is a clear answer rather than a wait without end."""
        now = time.monotonic()
        if sequence.slot_refused_at is None:
            sequence.slot_refused_at = now
        elif now - sequence.slot_refused_at >= self.slot_wait_seconds:
            self._dequeue(sequence)
            key = sequence.adapter.key if sequence.adapter is not None else None
            sequence.fail(SlotUnavailable(
                f"no adapter slot came free for adapter {key} within {self.slot_wait_seconds:g} s: every slot is "
                "pinned or serving other requests", wait_seconds=self.slot_wait_seconds))

    @staticmethod
    def _weights(sequence: Sequence) -> Any:
        return sequence.adapter.weights if sequence.adapter is not None else None

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
        """Run the prompts of `group` through the model in one left-padded pass (a KV-prefix request always
        comes alone), sample each row's first token and add the rows still going to the batch. Rows with the same
        prompt and adapter (a request's n choices) are computed once: their KV rows are copies of that one's."""
        metrics.PROMPT_TOKENS.labels(self.name).inc(sum(len(s.prompt_ids) for s in group))
        firsts: dict[tuple[Any, ...], int] = {}
        source = []  # each sequence's row in the forward pass
        for sequence in group:
            key = (tuple(sequence.prompt_ids), sequence.adapter.key if sequence.adapter is not None else None,
                   sequence.slot)
            source.append(firsts.setdefault(key, len(firsts)))
        computed = [group[source.index(row)] for row in range(len(firsts))]
        inputs = prefill_inputs([s.prompt_ids for s in computed], [self._weights(s) for s in computed],
                                model=self.model, device=self.device)
        record = any(s.logits is not None for s in group)
        with self.model_lock, self.bank.route([s.slot for s in computed]):
            # Only the last position's logits are needed to sample; the lm_head over every prompt
            # position would cost as much as the rest of a short prompt's prefill.
            out = self.model(**inputs.model_kwargs, use_cache=True, logits_to_keep=0 if record else 1)
        keep = []
        for index, sequence in enumerate(group):
            row = source[index]
            if sequence.logits is not None:
                sequence.logits.append(out.logits[row, inputs.width - len(sequence.prompt_ids):].clone())
            sequence.length = int(inputs.mask[row].sum())
            sequence.accept(sequence.pick(out.logits[row, -1]), self.eos_ids)
            if sequence.finish_reason is None:
                keep.append(index)
        if not keep:
            return
        layers = out.past_key_values.layers
        rows = torch.tensor([source[i] for i in keep], device=self.device)
        self.batch.add([layer.keys.index_select(0, rows) for layer in layers],
                       [layer.values.index_select(0, rows) for layer in layers], inputs.mask.index_select(0, rows))
        self.active.extend(group[i] for i in keep)

    @torch.inference_mode()
    def _step(self) -> None:
        rows = self.active
        metrics.DECODE_BATCH_SIZE.labels(self.name).observe(len(rows))
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
                sequence.accept(sequence.pick(out.logits[row, -1]), self.eos_ids)
            if sequence.finish_reason is None:
                keep.append(row)
        if len(keep) < len(rows):
            self.active = [rows[i] for i in keep]
            self.batch.keep(keep)
