"""The serving engine's Prometheus metrics (adaptery_*): tokens, time to first token, inter-token latency,
decode batch sizes, adapter loads, load time and evictions. State (residency, in-flight requests) is read
from the engine when /metrics is scraped (app/metrics.py), not kept here.

With PROMETHEUS_MULTIPROC_DIR set (`adaptery serve` sets it), values go to files there and the API's
/metrics sums every process's; without it they stay in this process.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Histogram

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

GENERATED_TOKENS = Counter("adaptery_inference_generated_tokens", "Tokens generated, by base model", ["base_model"])
PROMPT_TOKENS = Counter("adaptery_inference_prompt_tokens", "Prompt tokens prefilled, by base model", ["base_model"])
TIME_TO_FIRST_TOKEN = Histogram("adaptery_time_to_first_token_seconds",
                                "From a request's submission to its first generated token", ["base_model"],
                                buckets=LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("adaptery_inter_token_latency_seconds", "Between a request's consecutive tokens",
                                ["base_model"], buckets=LATENCY_BUCKETS)
DECODE_BATCH_SIZE = Histogram("adaptery_decode_batch_size", "Sequences in one decode step", ["base_model"],
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ADAPTER_LOADS = Counter("adaptery_adapter_loads", "Adapters loaded from disk into memory", ["base_model"])
ADAPTER_LOAD_SECONDS = Histogram("adaptery_adapter_load_seconds", "Loading one adapter from disk", ["base_model"],
                                 buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
ADAPTER_EVICTIONS = Counter("adaptery_adapter_evictions", "Adapters moved down a tier to make room",
                            ["base_model", "tier"])
