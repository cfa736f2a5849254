"""Inference requests: resolve `model` to a base model and maybe an adapter, then run the engine; and the
fairness of serving between tenants: each tenant's concurrent generations and pins are counted here (per serving
process), every generation has a deadline, and the result is awaited on the event loop, so a request waiting for
the engine holds no thread of the pool that every sync route shares.

The engine (and torch) is created on the first inference request, so an API process that only
manages files and jobs starts in about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Adapter, AdapterStatus
from app.errors import Conflict, InvalidRequest, LimitReached, NotFound, TimedOut, Unavailable, Unprocessable
from app.services.ids import new_id, storable
from app.settings import Settings

log = logging.getLogger(__name__)

_engine: Any = None
_engine_lock = threading.Lock()


def get_engine(settings: Settings) -> Any:
    global _engine
    with _engine_lock:
        if _engine is None:
            import torch

            from adapters.base_models import resolve_device
            from adapters.compute import serving_dtype
            from adapters.engine import InferenceEngine
            from app.services import base_models

            torch.set_num_threads(settings.torch_threads)

            def load_base(model_id: str) -> tuple[Any, Any]:
                spec = base_models.resolve(settings, model_id)
                dtype = serving_dtype(resolve_device(settings.device), settings.serving_dtype, settings.data_dir)
                log.info("serving base model %s in %s (ADAPTERY_SERVING_DTYPE=%s)", model_id, dtype,
                         settings.serving_dtype)
                return (base_models.load_model(settings, spec, dtype=dtype),
                        base_models.load_tokenizer(settings, spec))

            _engine = InferenceEngine(load_base=load_base, cache_size=settings.adapter_cache_size,
                                      max_rank=settings.max_lora_rank, cpu_cache_size=settings.adapter_cpu_cache_size,
                                      max_batch=settings.max_batch_size,
                                      slot_wait_seconds=settings.adapter_slot_wait_seconds,
                                      cpu_cache_bytes=settings.adapter_cpu_cache_mb * 1024 * 1024)
        return _engine


def engine_if_started() -> Any:
    return _engine


@dataclass
class Target:
    base_model: str
    adapter: Adapter | None
    name: str


def resolve_model(session: Session, *, tenant_id: str, settings: Settings, name: str) -> Target:
    from app.services import base_models

    try:
        return Target(base_model=base_models.resolve(settings, name).id, adapter=None, name=name)
    except base_models.UnknownBaseModel:
        pass
    adapter = adapter_by_name(session, tenant_id=tenant_id, name=name, include_public=True)
    if adapter is None:
        raise NotFound(f"The model '{name}' does not exist. GET /v1/models lists the base models and "
                       "fine-tuned models you can use.", param="model", code="model_not_found")
    return Target(base_model=adapter.base_model, adapter=adapter, name=name)


def adapter_ref(settings: Settings, adapter: Adapter) -> Any:
    from adapters.engine import AdapterRef
    from adapters.store import ArtifactStore

    return AdapterRef(key=adapter.id, folder=ArtifactStore.for_settings(settings).fetch_adapter(adapter.id),
                      base_model=adapter.base_model, method=adapter.method)


def load_into_memory(settings: Settings, adapter: Adapter) -> tuple[Any, Any]:
    """The adapter's runtime and loaded weights; a broken adapter is a 422 naming the reason."""
    from adapters.engine import AdapterLoadError

    runtime = get_engine(settings).runtime(adapter.base_model)
    try:
        return runtime, runtime.adapters.load(adapter_ref(settings, adapter))
    except AdapterLoadError as exc:
        raise Unprocessable(f"The model '{adapter.name}' could not be loaded: {exc}", param="model",
                            code="adapter_load_failed") from None
    except OSError as exc:  # the artifact store could not give its files (IncompleteArtifact, a network error)
        raise Unprocessable(f"The model '{adapter.name}' could not be fetched from the artifact store: {exc}",
                            param="model", code="adapter_unavailable") from None


def _check_budget(settings: Settings, runtime: Any, prompt_tokens: int, max_tokens: int | None) -> int:
    limit = getattr(runtime.model.config, "max_position_embeddings", 2048)
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise InvalidRequest(f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}.",
                             param="max_tokens", code="invalid_value")
    room = limit - prompt_tokens
    if room < 1:
        raise InvalidRequest(f"The prompt is {prompt_tokens} tokens; this model's context is {limit} tokens.",
                             param="messages", code="context_length_exceeded")
    wanted = max_tokens if max_tokens is not None else min(settings.max_tokens_limit, 256)
    if wanted > room:
        if max_tokens is not None:
            raise InvalidRequest(f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds this "
                                 f"model's context of {limit} tokens.", param="max_tokens",
                                 code="context_length_exceeded")
        wanted = room
    return wanted


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: the request's for the first (so n=1 samples as before), then values derived from it
    deterministically, so a seeded request with n > 1 gives the same choices every time."""
    if seed is None or index == 0:
        return seed
    return (seed + index * 0x9E3779B97F4A7C15) % 2**64


def _logit_bias(runtime: Any, request: Any) -> dict[int, float]:
    if not request.logit_bias:
        return {}
    vocab = int(runtime.model.config.vocab_size)
    bias = {int(key): value for key, value in request.logit_bias.items()}
    outside = [key for key in bias if key >= vocab]
    if outside:
        raise InvalidRequest(f"logit_bias names token {outside[0]}, but this model's vocabulary has {vocab} tokens "
                             f"(ids 0 to {vocab - 1}).", param="logit_bias", code="invalid_value")
    return bias


def _vocabulary(runtime: Any) -> tuple[Any, int, list[int]]:
    """What a grammar is built against: the runtime's tokenizer, its logits' width and its end tokens."""
    return runtime.tokenizer, int(runtime.model.config.vocab_size), sorted(runtime.eos_ids)


def _tool_grammar(runtime: Any, request: Any) -> Any:
    """tool_choice "required" or a named function: the answer can only be calls (of that function), with arguments
    valid against its parameters."""
    from adapters.engine.grammar import SchemaError, tool_call_grammar

    mode = request.tool_mode()
    tools = request.tools if mode == "required" else [
        tool for tool in request.tools if tool.function.name == request.tool_choice.function.name]
    functions = [(tool.function.name, tool.function.parameters) for tool in tools]
    try:
        return tool_call_grammar(*_vocabulary(runtime), functions,
                                 parallel=mode == "required" and request.parallel_tool_calls is not False)
    except SchemaError as exc:
        index = request.tools.index(tools[exc.index]) if exc.index is not None else None
        param = f"tools[{index}].function.parameters" if index is not None else "tools"
        raise InvalidRequest(f"{param}: {exc}", param=param, code="invalid_schema") from None


def _output_grammar(runtime: Any, request: Any) -> Any:
    """The grammar a JSON response_format or a forced tool call constrains each choice to (None: free text); a
    schema the engine cannot use is a 400 naming it."""
    if getattr(request, "tool_mode", lambda: "none")() in ("required", "function"):
        return _tool_grammar(runtime, request)
    response_format = getattr(request, "response_format", None)
    if response_format is None:
        return None
    is_json, schema, strict = response_format.constraint()
    if not is_json:
        return None
    from adapters.engine.grammar import SchemaError, json_grammar

    try:
        return json_grammar(*_vocabulary(runtime), schema, strict=strict)
    except SchemaError as exc:
        param = "response_format.json_schema.schema" if schema is not None else "response_format"
        raise InvalidRequest(f"{param}: {exc}", param=param, code="invalid_schema") from None


def _submit(settings: Settings, target: Target, prompt_ids_fn: Callable[[Any], list[int]], request: Any,
            tenant: str | None) -> list[Any]:
    from adapters.engine import SamplingParams

    check_choices(settings, request.n)
    if target.adapter is not None:
        runtime, adapter = load_into_memory(settings, target.adapter)
    else:
        runtime, adapter = get_engine(settings).runtime(target.base_model), None
    prompt_ids = prompt_ids_fn(runtime.tokenizer)
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
    budget = _check_budget(settings, runtime, len(prompt_ids), max_tokens)
    bias = _logit_bias(runtime, request)
    grammar = _output_grammar(runtime, request)
    params = [SamplingParams(max_tokens=budget, temperature=request.temperature, top_p=request.top_p,
                             stop=request.stop_list(), seed=_choice_seed(request.seed, index),
                             presence_penalty=request.presence_penalty or 0.0,
                             frequency_penalty=request.frequency_penalty or 0.0,
                             repetition_penalty=request.repetition_penalty or 1.0, logit_bias=bias,
                             logprobs=request.engine_logprobs(), grammar=grammar)
              for index in range(request.n)]
    return runtime.submit_choices(prompt_ids, adapter, params, tenant=tenant)  # type: ignore[no-any-return]


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_prompt(request: Any) -> Callable[[Any], list[int]]:
    from adapters.tool_calls import chat_messages, native_tools

    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.text() if m.content is not None else None,
                 "tool_calls": [call.model_dump() for call in m.tool_calls] if m.tool_calls else None,
                 "tool_call_id": m.tool_call_id} for m in request.messages]
    # With tool_choice "none" the functions are not offered (the conversation's earlier calls still render).
    tools = ([tool.model_dump(exclude_none=True) for tool in request.tools]
             if request.tools and request.tool_mode() != "none" else None)

    def prompt_ids(tokenizer: Any) -> list[int]:
        shaped, template_tools = chat_messages(messages, tools, native=native_tools(tokenizer))
        extra = {"tools": template_tools} if template_tools else {}
        text = tokenizer.apply_chat_template(shaped, tokenize=False, add_generation_prompt=True, **extra)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return prompt_ids


def tool_names(request: Any) -> set[str] | None:
    """The functions whose calls an answer is read for (None: the answer is text only)."""
    mode = request.tool_mode() if hasattr(request, "tool_mode") else "none"
    if mode == "none":
        return None
    return {tool.function.name for tool in request.tools}


def _completion_prompt(request: Any) -> Callable[[Any], list[int]]:
    if isinstance(request.prompt, list) and len(request.prompt) != 1:
        raise InvalidRequest("prompt must be a string or a list of exactly one string.", param="prompt",
                             code="invalid_value")
    prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]

    def prompt_ids(tokenizer: Any) -> list[int]:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidRequest("prompt must not be empty.", param="prompt", code="invalid_value")
        return ids

    return prompt_ids


def start(settings: Settings, target: Target, request: Any, *, chat: bool, tenant: str | None = None) -> list[Any]:
    """Validate and queue a request; returns its engine Sequences, one per choice (their .wait() or events give the
    results). Runs in
    the caller's thread: loading an adapter from disk and tokenising happen here."""
    return _submit(settings, target, _chat_prompt(request) if chat else _completion_prompt(request), request, tenant)


# ------------------------------------------------------------------ fairness: concurrency, deadlines, awaiting


# Seconds a refused generation is told to wait: clients that honour Retry-After (the OpenAI SDK does) then retry
# a few times a second at most, rather than as fast as the refusals come back.
CONCURRENCY_RETRY_AFTER = 2


@dataclass
class _Claim:
    """One generation request of a tenant, counted from before it is queued until its sequence ends."""

    weight: int = 1  # its choices (n): each is a row in the batch
    sequences: list[Any] | None = None
    released: bool = False

    def release(self) -> None:
        self.released = True

    def live(self) -> bool:
        # A cancelled sequence (timed out, client gone) leaves its row at the next step: it no longer counts.
        return not self.released and (self.sequences is None or any(
            s.finish_reason is None and not s.cancelled.is_set() for s in self.sequences))


# Each tenant's generation requests in this process. Pruned at each claim: a finished request drops out however it
# ended (answered, timed out, the client gone, or a stream whose response never started).
_claims: dict[str, list[_Claim]] = {}
_claims_lock = threading.Lock()


def check_choices(settings: Settings, n: int) -> None:
    """n above max_choices_per_request, or above the tenant concurrency limit (such a request could never run), is
    a 400 naming `n`. Checked with the model's other limits (max_tokens), after the model is resolved."""
    most = min(settings.max_concurrent_generations_per_tenant, settings.max_choices_per_request)
    if n > most:
        setting = ("ADAPTERY_MAX_CHOICES_PER_REQUEST" if most == settings.max_choices_per_request
                   else "ADAPTERY_MAX_CONCURRENT_GENERATIONS_PER_TENANT")
        raise InvalidRequest(f"n is {n}; this server generates at most {most} choices per request ({setting}).",
                             param="n", code="invalid_value")


def _claim(settings: Settings, tenant: str, n: int = 1) -> _Claim:
    """Each of a request's n choices counts as one generation against the tenant's limit (an n above the limit
    counts as the limit here, and is refused by `check_choices`)."""
    limit = settings.max_concurrent_generations_per_tenant
    n = min(n, limit)
    with _claims_lock:
        live = [claim for claim in _claims.get(tenant, []) if claim.live()]
        running = sum(claim.weight for claim in live)
        if running + n > limit:
            _claims[tenant] = live
            raise LimitReached(f"This tenant already has {running} generations waiting or running (each choice of n "
                               f"counts); at most {limit} may run at once "
                               "(ADAPTERY_MAX_CONCURRENT_GENERATIONS_PER_TENANT). Retry when one has finished.",
                               code="too_many_concurrent_requests", retry_after=CONCURRENCY_RETRY_AFTER)
        claim = _Claim(weight=n)
        _claims[tenant] = [*live, claim]
        return claim


@dataclass
class Running:
    """A queued generation (one sequence per choice) and its deadline; its events are awaited on the event loop,
    never in a thread."""

    settings: Settings
    sequences: list[Any]
    deadline: float  # on the event loop's clock
    woken: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        loop = asyncio.get_running_loop()

        def notify() -> None:  # called on the scheduler thread, after each event
            with contextlib.suppress(RuntimeError):  # the loop has closed (its request is gone): nobody waits
                loop.call_soon_threadsafe(self.woken.set)

        for sequence in self.sequences:
            sequence.notify = notify

    @property
    def tokenizer(self) -> Any:
        return self.sequences[0].tokenizer

    def cancel(self) -> None:
        """Free every choice's row at the next step (a no-op for those that finished)."""
        for sequence in self.sequences:
            sequence.cancel()

    async def next_event(self) -> tuple[int, str, Any]:
        """The next event of any choice, as (choice index, kind, value); past the deadline every choice is
        cancelled (its row is freed at the next step) and TimedOut raised."""
        loop = asyncio.get_running_loop()
        while True:
            for index, sequence in enumerate(self.sequences):
                try:
                    kind, value = sequence.events.get_nowait()
                    return index, kind, value
                except queue.Empty:
                    pass
            remaining = self.deadline - loop.time()
            if remaining <= 0:
                self.cancel()
                timeout = self.settings.generation_timeout_seconds
                raise TimedOut(f"The generation did not finish within {timeout:g} s "
                               "(ADAPTERY_GENERATION_TIMEOUT_SECONDS) and was ended; ask for fewer tokens (max_tokens) "
                               "or retry later.", code="generation_timeout")
            try:
                await asyncio.wait_for(self.woken.wait(), remaining)
            except TimeoutError:
                continue  # the check above answers
            self.woken.clear()

    async def first_event(self) -> tuple[int, str, Any]:
        """The next event; an engine refusal (no slot came free) becomes its HTTP answer."""
        event = await self.next_event()
        if event[1] == "error":
            raise _engine_error(self.settings, event[2])
        return event

    async def result(self) -> list[Any]:
        """Every choice's final Generation, in choice order."""
        results: list[Any] = [None] * len(self.sequences)
        while any(result is None for result in results):
            index, kind, value = await self.first_event()
            if kind == "done":
                results[index] = value
        return results


def _engine_error(settings: Settings, error: Exception) -> Exception:
    from adapters.engine import SlotUnavailable

    if isinstance(error, SlotUnavailable):
        return Unavailable(f"The model's adapter could not get a slot in the serving engine: every adapter slot is "
                           f"pinned or serving other requests, and a request waits at most "
                           f"{settings.adapter_slot_wait_seconds:g} s for one (ADAPTERY_ADAPTER_SLOT_WAIT_SECONDS). "
                           "Retry later.", param="model", code="no_free_slot", retry_after=1)
    return error


def claim_generation(settings: Settings, tenant: str, n: int = 1) -> _Claim:
    """Count a generation request of n choices against its tenant's concurrency limit (a 429 over it). Called
    before anything else the request costs (resolving its model, tokenising), so that a tenant's refused flood costs
    little."""
    return _claim(settings, tenant, n)


async def begin(settings: Settings, target: Target, request: Any, *, chat: bool, tenant: str,
                started: float | None = None, claim: _Claim | None = None) -> Running:
    """Count the request against its tenant's concurrency limit (unless `claim` already did; a 429 over it), queue
    it (in a worker thread: an adapter may load from disk), and return it with its deadline,
    `generation_timeout_seconds` after `started` (the event loop's time when the request arrived; now if not
    given)."""
    loop = asyncio.get_running_loop()
    deadline = (started if started is not None else loop.time()) + settings.generation_timeout_seconds
    claim = claim or _claim(settings, tenant, request.n)
    try:
        sequences = await anyio.to_thread.run_sync(
            lambda: start(settings, target, request, chat=chat, tenant=tenant))
    except BaseException:
        claim.released = True
        raise
    claim.sequences = sequences
    return Running(settings=settings, sequences=sequences, deadline=deadline)


def _token_text(tokenizer: Any, token: int) -> tuple[str, list[int]]:
    from adapters.engine import token_text

    return token_text(tokenizer, token)  # type: ignore[no-any-return]


def chat_logprobs(tokenizer: Any, entries: list[Any]) -> dict[str, Any]:
    """Chat's `logprobs`: {content: [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        text, raw = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**one(entry.token, entry.logprob),
                         "top_logprobs": [one(token, logprob) for token, logprob in entry.top]}
                        for entry in entries]}


def completion_logprobs(tokenizer: Any, entries: list[Any], offset: int = 0) -> dict[str, Any]:
    """Completions' `logprobs`: {tokens, token_logprobs, top_logprobs, text_offset}; offsets count from `offset`
    (the characters of the choice's text before these tokens)."""
    tokens, offsets = [], []
    for entry in entries:
        text = _token_text(tokenizer, entry.token)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{_token_text(tokenizer, token)[0]: logprob for token, logprob in entry.top}
                             for entry in entries],
            "text_offset": offsets}


def _logprobs(tokenizer: Any, entries: list[Any] | None, *, chat: bool, offset: int = 0) -> dict[str, Any] | None:
    if entries is None:
        return None
    return chat_logprobs(tokenizer, entries) if chat else completion_logprobs(tokenizer, entries, offset)


def _usage_of(results: list[Any]) -> dict[str, int]:
    # The prompt is counted once (its prefill is shared), the completion tokens of every choice.
    return _usage(results[0].prompt_tokens, sum(len(result.token_ids) for result in results))


def _tool_call_objects(calls: list[Any]) -> list[dict[str, Any]]:
    # OpenAI's shape of a call id ("call_" and letters or digits): some clients match on it.
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for call in calls]


def _finish(result: Any, called: bool) -> str:
    return "tool_calls" if called and result.finish_reason == "stop" else str(result.finish_reason)


def chat_message(result: Any, names: set[str] | None) -> tuple[dict[str, Any], bool]:
    """The assistant message of a result (its tool calls read into tool_calls when tools were offered), and whether
    it called any."""
    from adapters.tool_calls import parse_tool_calls

    parsed = parse_tool_calls(result.text, names) if names else None
    if parsed is None:
        return {"role": "assistant", "content": result.text}, False
    content, calls = parsed
    return {"role": "assistant", "content": content, "tool_calls": _tool_call_objects(calls)}, True


def response_body(target: Target, results: list[Any], *, chat: bool, tokenizer: Any = None,
                  names: set[str] | None = None) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    for index, result in enumerate(results):
        logprobs = _logprobs(tokenizer, result.logprobs, chat=chat)
        if chat:
            message, called = chat_message(result, names)
            choices.append({"index": index, "message": message, "finish_reason": _finish(result, called),
                            "logprobs": logprobs})
        else:
            choices.append({"index": index, "text": result.text, "finish_reason": result.finish_reason,
                            "logprobs": logprobs})
    return {"id": new_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": target.name, "choices": choices, "usage": _usage_of(results)}


async def stream_chunks(target: Target, running: Running, first: tuple[int, str, Any], *, chat: bool,
                        include_usage: bool, names: set[str] | None = None) -> AsyncIterator[str]:
    """OpenAI-style SSE data payloads, starting from the `first` event and ending with [DONE] once every choice has
    finished; each chunk carries one choice's text (and, when asked for, the logprobs of the tokens that made it).
    With tools (`names`), text from where a tool call may begin is held back, and at the choice's end its calls go
    out as one `delta.tool_calls` chunk (or the held text as content, when it was no call).
    An error (the generation timeout included) ends the stream with an error event; leaving early (client gone)
    frees the sequences."""
    from adapters.tool_calls import call_prefix_length, parse_tool_calls

    tokenizer = running.tokenizer
    chunk_id, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    choices = len(running.sequences)
    pending: list[list[Any]] = [[] for _ in range(choices)]  # logprobs waiting for their text
    offsets = [0] * choices  # characters of each choice's text sent (completions' text_offset)
    results: list[Any] = [None] * choices
    held = [""] * choices  # text that may be (the start of) a tool call, not sent yet

    def chunk(index: int, delta: str | None, finish: str | None, role: bool = False,
              entries: list[Any] | None = None, calls: list[Any] | None = None) -> str:
        logprobs = _logprobs(tokenizer, entries, chat=chat, offset=offsets[index]) if entries else None
        if chat:
            body: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": delta} if delta is not None else {})
            if calls:
                body["tool_calls"] = [{"index": number, **call} for number, call in enumerate(calls)]
            choice: dict[str, Any] = {"index": index, "delta": body, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}
        return json.dumps({"id": chunk_id, "object": kind, "created": created, "model": target.name,
                           "choices": [choice]})

    def failed(message: str, code: str | None = None) -> str:
        return json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}})

    try:
        if chat:
            for index in range(choices):
                yield chunk(index, None, None, role=True)
        event: tuple[int, str, Any] | None = first
        while True:
            if event is None:
                try:
                    event = await running.next_event()
                except TimedOut as exc:
                    yield failed(exc.message, exc.code)
                    return
            index, name, value = event
            event = None
            if name == "logprobs":
                pending[index].extend(value)
            elif name == "delta":
                if names:
                    held[index] += value
                    cut = call_prefix_length(held[index])
                    value, held[index] = held[index][:cut], held[index][cut:]
                if value:
                    yield chunk(index, value, None, entries=pending[index])
                    offsets[index] += len(value)
                    pending[index] = []
            elif name == "error":
                yield failed(f"generation failed: {value}")
                return
            elif name == "done":
                results[index] = value
                finish = "stop" if value.finish_reason == "cancelled" else value.finish_reason
                # Tokens whose text never went out (cut by a stop string, or held back) still have their logprobs
                # sent.
                remaining = pending[index] + (value.logprobs[running.sequences[index].logprobs_sent:]
                                              if value.logprobs else [])
                if held[index]:
                    parsed = parse_tool_calls(held[index], names) if names else None
                    content, calls = parsed if parsed is not None else (held[index], [])
                    if calls and finish == "stop":
                        finish = "tool_calls"
                    yield chunk(index, content, None, entries=remaining,
                                calls=_tool_call_objects(calls) if calls else None)
                    remaining = []
                yield chunk(index, None, finish, entries=remaining or None)
                if all(result is not None for result in results):
                    if include_usage:
                        yield json.dumps({"id": chunk_id, "object": kind, "created": created, "model": target.name,
                                          "choices": [], "usage": _usage_of(results)})
                    yield "[DONE]"
                    return
    finally:
        running.cancel()  # a no-op for choices that finished; frees the rows when the client left


# ------------------------------------------------------------------ adapter residency


def _loaded_runtime(base_model: str) -> Any:
    """The runtime serving this base model in this process, if it has been started (never starts one)."""
    engine = engine_if_started()
    return engine.loaded_runtime(base_model) if engine is not None else None


def adapter_object(adapter: Adapter) -> dict[str, Any]:
    runtime = _loaded_runtime(adapter.base_model)
    residency = runtime.adapters.residency(adapter.id) if runtime is not None else None
    if residency is None:  # role api: what the inference replicas last reported
        from app.services import routing

        remote = routing.residency(adapter.id)
        if remote is not None:
            return {**adapter_object_from(adapter, None),
                    **{k: remote.get(k) for k in ("state", "pinned", "last_used_at", "load_ms", "rank", "error")}}
    return adapter_object_from(adapter, residency)


def adapter_object_from(adapter: Adapter, residency: Any) -> dict[str, Any]:
    return {
        "id": adapter.id, "object": "adapter", "name": adapter.name, "base_model": adapter.base_model,
        "method": adapter.method, "job_id": adapter.job_id, "created_at": adapter.created_at,
        "size_bytes": adapter.size_bytes,
        "state": str(residency.state) if residency else "on_disk",
        "pinned": residency.pinned if residency else False,
        "last_used_at": residency.last_used_at if residency else None,
        "load_ms": residency.load_ms if residency else None,
        "rank": residency.rank if residency else None,
        "error": residency.error if residency else None,
    }


def adapter_by_name(session: Session, *, tenant_id: str, name: str, include_public: bool = False,
                    aliases: bool = True) -> Adapter | None:
    """What `name` (a `model`, `from_model`, ...) means to this tenant: its own adapter of that name, else (with
    `aliases`) the adapter its alias of that name points to now (app/services/aliases.py), else the adapter with
    that id if it is the tenant's own or (include_public: for using it) public. None looks like missing. Names are
    per tenant, so a bare name never reaches another tenant's adapter: two tenants may both publish 'support-bot',
    and a third addresses each by its id (GET /v1/models lists it so)."""
    if not storable(name):
        return None
    adapter = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name,
                                                   Adapter.status == AdapterStatus.ready))
    if adapter is not None:
        return adapter
    if aliases:
        from app.services.aliases import target_of

        adapter = target_of(session, tenant_id=tenant_id, name=name)
        if adapter is not None:
            return adapter
    adapter = session.get(Adapter, name)
    if adapter is None or adapter.status != AdapterStatus.ready or \
            not (adapter.tenant_id == tenant_id or (include_public and adapter.public)):
        return None
    return adapter


def get_adapter(session: Session, *, tenant_id: str, adapter_id: str) -> Adapter:
    """By id, or by the model name clients use (ft:...)."""
    adapter = session.get(Adapter, adapter_id) if storable(adapter_id) else None
    if adapter is None or adapter.tenant_id != tenant_id or adapter.status != AdapterStatus.ready:
        adapter = adapter_by_name(session, tenant_id=tenant_id, name=adapter_id)
    if adapter is None:
        raise NotFound(f"No adapter found with id '{adapter_id}'.", param="adapter_id", code="not_found")
    return adapter


def list_adapters(session: Session, *, tenant_id: str) -> list[Adapter]:
    return list(session.scalars(select(Adapter).where(Adapter.tenant_id == tenant_id,
                                                      Adapter.status == AdapterStatus.ready)
                                .order_by(Adapter.created_at.desc(), Adapter.name)))


def preload(settings: Settings, adapter: Adapter) -> None:
    runtime, loaded = load_into_memory(settings, adapter)
    if runtime.activate(adapter.id) < 0:
        raise Conflict("Every adapter slot is serving a request or pinned; try again shortly.",
                       code="no_free_slot", retry_after=1)


# Checking a pin against the quotas and recording it happen together, so two pins at once cannot both take the last
# place; loading the adapter into its slot happens before, outside it.
_pin_lock = threading.Lock()


def _check_pin(settings: Settings, adapter: Adapter) -> bool:
    """Whether the adapter still needs pinning (False: it is pinned already); raises when a quota refuses it. A pin
    counts against its adapter's tenant (per serving process, every base model) and against its base model's slots
    (one stays unpinned for everyone else)."""
    engine = get_engine(settings)
    cache = engine.runtime(adapter.base_model).adapters
    if getattr(cache.residency(adapter.id), "pinned", False):
        return False
    limit = settings.max_pinned_adapters_per_tenant
    mine = sum(runtime.adapters.pinned_count(adapter.tenant_id) for runtime in engine.runtimes().values())
    if mine >= limit:
        # Pins do not expire: Retry-After is a hint to come back after unpinning, not a promise.
        raise LimitReached(f"This tenant has {mine} adapters pinned; at most {limit} may be pinned at once per serving "
                           "process (ADAPTERY_MAX_PINNED_ADAPTERS_PER_TENANT). Unpin one first.",
                           code="too_many_pinned_adapters", retry_after=60)
    if cache.pinned_count() >= cache.cache_size - 1:
        raise Conflict(f"At most {cache.cache_size - 1} adapters may be pinned per base model "
                       "(one slot stays free for the rest; ADAPTERY_ADAPTER_CACHE_SIZE).", code="too_many_pinned")
    return True


def pin(settings: Settings, adapter: Adapter, pinned: bool) -> None:
    if pinned:
        if not _check_pin(settings, adapter):
            return
        preload(settings, adapter)
        with _pin_lock:
            if _check_pin(settings, adapter):
                get_engine(settings).runtime(adapter.base_model).adapters.pin(adapter.id, True, adapter.tenant_id)
    else:
        runtime = _loaded_runtime(adapter.base_model)
        if runtime is not None:
            runtime.adapters.pin(adapter.id, False)


def unpin_everywhere(adapter_id: str) -> bool:
    """Unpin an adapter in every runtime of this process (the admin's unpin: it need not be the caller's); whether
    it was pinned anywhere."""
    engine = engine_if_started()
    was_pinned = False
    for runtime in (engine.runtimes().values() if engine is not None else []):
        if getattr(runtime.adapters.residency(adapter_id), "pinned", False):
            runtime.adapters.pin(adapter_id, False)
            was_pinned = True
    return was_pinned


def unload(adapter: Adapter) -> None:
    runtime = _loaded_runtime(adapter.base_model)
    if runtime is None:
        return
    from adapters.engine import AdapterState

    residency = runtime.adapters.residency(adapter.id)
    if residency is None or residency.state not in (AdapterState.CPU, AdapterState.ACTIVE):
        return
    if residency.pinned:
        raise Conflict("The adapter is pinned; unpin it first.", code="adapter_pinned")
    if not runtime.unload(adapter.id):
        raise Conflict("The adapter is serving a request; try again shortly.", code="adapter_in_use",
                       retry_after=1)
