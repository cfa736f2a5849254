"""The serving engine: one copy of each base model in memory, many adapters, continuous batching.

Modules: sequence (a request in flight, sampling), kv_cache (the running batch's cache), residency
(adapter lifecycle records and the LRU tier), adapter_cache (one base model's adapters: the memory and slot
tiers, eviction), slot_bank and application (how each serving kind reaches a row's forward pass),
adapter_loader (files → serving weights via the method registry), scheduler (one base model's runtime and
decode loop), engine (runtimes by base model).
"""

from adapters.engine.adapter_cache import AdapterCache, AdapterRef
from adapters.engine.adapter_loader import AdapterLoadError, LoadedAdapter
from adapters.engine.engine import InferenceEngine
from adapters.engine.residency import AdapterState, Residency
from adapters.engine.scheduler import BaseRuntime, SlotUnavailable
from adapters.engine.sequence import Generation, SamplingParams, Sequence, TokenLogprob, token_text

__all__ = ["AdapterCache", "AdapterLoadError", "AdapterRef", "AdapterState", "BaseRuntime", "Generation",
           "InferenceEngine", "LoadedAdapter", "Residency", "SamplingParams", "Sequence", "SlotUnavailable",
           "TokenLogprob", "token_text"]
