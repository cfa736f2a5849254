"""The serving engine: one copy of each base model in memory, adapters attached per request.

Adapters are loaded on first use and kept in a bounded LRU; evicting one detaches its tensors and
nothing else, so a newly trained adapter is served without restarting or rebuilding anything.
Requests on one base model run one at a time for now (a lock); the projections already route
adapters per batch row, which is what continuous batching will build on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.engine.adapter_loader import AdapterLoadError, LoadedAdapter, load_adapter
from adapters.engine.lora_layers import LoraRegistry

log = logging.getLogger("adaptery.engine")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int


@dataclass
class AdapterRef:
    """Where to find an adapter: a stable key (its id), its folder, and the base model it needs."""

    key: str
    folder: Path
    base_model: str


class BaseRuntime:
    """One loaded base model with its tokenizer, hooked projections and resident adapters."""

    def __init__(self, model: Any, tokenizer: Any, *, cache_size: int, max_rank: int):
        self.model = model
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self.max_rank = max_rank
        suffixes = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n != "lm_head"}
        self.device = next(model.parameters()).device
        self.lora = LoraRegistry(model, suffixes)
        self.adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.lock = threading.RLock()
        self.eos_ids = self._eos_ids()

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

    # ------------------------------------------------------------ adapters

    def ensure_adapter(self, ref: AdapterRef) -> LoadedAdapter:
        with self.lock:
            loaded = self.adapters.get(ref.key)
            if loaded is not None:
                self.adapters.move_to_end(ref.key)
                return loaded
            try:
                loaded = load_adapter(ref.folder, key=ref.key, model_config=self.model.config,
                                      max_rank=self.max_rank, device=self.device)
                if loaded.kind == "lora":
                    self.lora.attach(ref.key, loaded.lora)
            except (KeyError, ValueError, OSError) as exc:
                if isinstance(exc, AdapterLoadError):
                    raise
                raise AdapterLoadError(f"adapter {ref.key} could not be loaded: {exc}") from exc
            self.adapters[ref.key] = loaded
            while len(self.adapters) > self.cache_size:
                evicted, _ = self.adapters.popitem(last=False)
                self.lora.detach(evicted)
                log.info("evicted adapter %s", evicted)
            return loaded

    def unload(self, key: str) -> bool:
        with self.lock:
            if self.adapters.pop(key, None) is None:
                return False
            self.lora.detach(key)
            return True

    # ------------------------------------------------------------ forward passes

    def _prefix_cache(self, adapter: LoadedAdapter | None, batch: int) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if adapter is not None and adapter.kind == "prefix":
            positions = torch.arange(adapter.num_virtual_tokens, device=self.device)
            for layer, (k, v) in enumerate(adapter.prefix):
                cache.update(k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1),
                             layer, cache_kwargs={"cache_position": positions})
        return cache

    @torch.inference_mode()
    def logits(self, input_ids: list[int], adapter: LoadedAdapter | None) -> torch.Tensor:
        """Logits for every position of one sequence (used by tests and evaluation)."""
        with self.lock:
            ids = torch.tensor([input_ids], device=self.device)
            prefix = adapter.num_virtual_tokens if adapter is not None and adapter.kind == "prefix" else 0
            mask = torch.ones(1, prefix + len(input_ids), dtype=torch.long, device=self.device)
            key = adapter.key if adapter is not None and adapter.kind == "lora" else None
            with self.lora.route([key]):
                out = self.model(input_ids=ids, attention_mask=mask,
                                 past_key_values=self._prefix_cache(adapter, 1), use_cache=True)
            return out.logits[0]

    @torch.inference_mode()
    def generate(self, input_ids: list[int], adapter: LoadedAdapter | None, params: SamplingParams,
                 on_token: Callable[[int], bool] | None = None) -> Generation:
        """Sample up to max_tokens; on_token may return False to stop early (client went away)."""
        with self.lock:
            return self._generate(input_ids, adapter, params, on_token)

    def _generate(self, input_ids: list[int], adapter: LoadedAdapter | None, params: SamplingParams,
                  on_token: Callable[[int], bool] | None) -> Generation:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % (2**63)))
        prefix = adapter.num_virtual_tokens if adapter is not None and adapter.kind == "prefix" else 0
        cache = self._prefix_cache(adapter, 1)
        key = adapter.key if adapter is not None and adapter.kind == "lora" else None
        produced: list[int] = []
        finish = "length"
        step_input = torch.tensor([input_ids], device=self.device)
        total = prefix + len(input_ids)
        with self.lora.route([key]):
            for _ in range(params.max_tokens):
                mask = torch.ones(1, total, dtype=torch.long, device=self.device)
                out = self.model(input_ids=step_input, attention_mask=mask, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = sample(out.logits[0, -1], params, generator)
                if token in self.eos_ids:
                    finish = "stop"
                    break
                produced.append(token)
                if on_token is not None and on_token(token) is False:
                    finish = "stop"
                    break
                if params.stop:
                    text = self.tokenizer.decode(produced, skip_special_tokens=True)
                    cut = first_stop(text, params.stop)
                    if cut is not None:
                        return Generation(text=text[:cut], token_ids=produced, finish_reason="stop",
                                          prompt_tokens=len(input_ids))
                step_input = torch.tensor([[token]], device=self.device)
                total += 1
        text = self.tokenizer.decode(produced, skip_special_tokens=True)
        return Generation(text=text, token_ids=produced, finish_reason=finish, prompt_tokens=len(input_ids))


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


class InferenceEngine:
    """Base runtimes by base-model id, created on first use."""

    def __init__(self, *, load_base: Callable[[str], tuple[Any, Any]], cache_size: int, max_rank: int):
        self._load_base = load_base
        self._cache_size = cache_size
        self._max_rank = max_rank
        self._runtimes: dict[str, BaseRuntime] = {}
        self._lock = threading.Lock()

    def runtime(self, base_model: str) -> BaseRuntime:
        with self._lock:
            runtime = self._runtimes.get(base_model)
            if runtime is None:
                model, tokenizer = self._load_base(base_model)
                runtime = BaseRuntime(model, tokenizer, cache_size=self._cache_size, max_rank=self._max_rank)
                self._runtimes[base_model] = runtime
            return runtime

    def loaded_bases(self) -> list[str]:
        return list(self._runtimes)
