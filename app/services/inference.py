"""Inference requests: resolve `model` to a base model and maybe an adapter, then run the engine.

The engine (and torch) is created on the first inference request, so an API process that only
manages files and jobs starts in about a second.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.errors import ApiError
from app.services.jobs import adapter_by_name, new_id
from app.settings import Settings

_engine: Any = None
_engine_lock = threading.Lock()


def get_engine(settings: Settings) -> Any:
    global _engine
    with _engine_lock:
        if _engine is None:
            import torch

            from adapters import base_models
            from adapters.engine.engine import InferenceEngine

            torch.set_num_threads(settings.torch_threads)

            def load_base(model_id: str) -> tuple[Any, Any]:
                spec = base_models.resolve(settings, model_id)
                return base_models.load_model(settings, spec), base_models.load_tokenizer(settings, spec)

            _engine = InferenceEngine(load_base=load_base, cache_size=settings.adapter_cache_size,
                                      max_rank=settings.max_lora_rank)
        return _engine


@dataclass
class Target:
    base_model: str
    adapter_id: str | None
    name: str


def resolve_model(session: Session, *, tenant_id: str, settings: Settings, name: str) -> Target:
    from adapters import base_models

    try:
        return Target(base_model=base_models.resolve(settings, name).id, adapter_id=None, name=name)
    except base_models.UnknownBaseModel:
        pass
    adapter = adapter_by_name(session, tenant_id=tenant_id, name=name)
    if adapter is None:
        raise ApiError(404, f"The model '{name}' does not exist. GET /v1/models lists the base models and "
                            "fine-tuned models you can use.", param="model", code="model_not_found")
    return Target(base_model=adapter.base_model, adapter_id=adapter.id, name=name)


def _runtime_and_adapter(settings: Settings, target: Target) -> tuple[Any, Any]:
    from adapters.engine.adapter_loader import AdapterLoadError
    from adapters.engine.engine import AdapterRef
    from adapters.store import ArtifactStore

    runtime = get_engine(settings).runtime(target.base_model)
    if target.adapter_id is None:
        return runtime, None
    ref = AdapterRef(key=target.adapter_id, folder=ArtifactStore(settings.data_dir).adapter_dir(target.adapter_id),
                     base_model=target.base_model)
    try:
        return runtime, runtime.ensure_adapter(ref)
    except AdapterLoadError as exc:
        raise ApiError(422, f"The model '{target.name}' could not be loaded: {exc}", param="model",
                       code="adapter_load_failed") from None


def _check_budget(settings: Settings, runtime: Any, prompt_tokens: int, max_tokens: int | None) -> int:
    limit = getattr(runtime.model.config, "max_position_embeddings", 2048)
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}.",
                       param="max_tokens", code="invalid_value")
    room = limit - prompt_tokens
    if room < 1:
        raise ApiError(400, f"The prompt is {prompt_tokens} tokens; this model's context is {limit} tokens.",
                       param="messages", code="context_length_exceeded")
    wanted = max_tokens if max_tokens is not None else min(settings.max_tokens_limit, 256)
    if wanted > room:
        if max_tokens is not None:
            raise ApiError(400, f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds this "
                                f"model's context of {limit} tokens.", param="max_tokens",
                           code="context_length_exceeded")
        wanted = room
    return wanted


def _run(settings: Settings, target: Target, prompt_ids_fn: Any, request: Any) -> tuple[Any, int]:
    from adapters.engine.engine import SamplingParams

    runtime, adapter = _runtime_and_adapter(settings, target)
    prompt_ids = prompt_ids_fn(runtime.tokenizer)
    max_tokens = request.max_completion_tokens if getattr(request, "max_completion_tokens", None) \
        else request.max_tokens
    budget = _check_budget(settings, runtime, len(prompt_ids), max_tokens)
    params = SamplingParams(max_tokens=budget, temperature=request.temperature, top_p=request.top_p,
                            stop=request.stop_list(), seed=request.seed)
    return runtime.generate(prompt_ids, adapter, params), len(prompt_ids)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(settings: Settings, target: Target, request: Any) -> dict[str, Any]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in request.messages]

    def prompt_ids(tokenizer: Any) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    result, n_prompt = _run(settings, target, prompt_ids, request)
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": target.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": _usage(n_prompt, len(result.token_ids)),
    }


def completion(settings: Settings, target: Target, request: Any) -> dict[str, Any]:
    prompt = request.prompt if isinstance(request.prompt, str) else "".join(request.prompt[:1])
    if isinstance(request.prompt, list) and len(request.prompt) != 1:
        raise ApiError(400, "prompt must be a string or a list of exactly one string.", param="prompt",
                       code="invalid_value")

    def prompt_ids(tokenizer: Any) -> list[int]:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "prompt must not be empty.", param="prompt", code="invalid_value")
        return ids

    result, n_prompt = _run(settings, target, prompt_ids, request)
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": target.name,
        "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": _usage(n_prompt, len(result.token_ids)),
    }
