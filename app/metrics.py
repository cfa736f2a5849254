"""Prometheus metrics at GET /metrics (names prefixed adaptery_): HTTP, training, and state read at scrape time.

Across processes: with PROMETHEUS_MULTIPROC_DIR set (`adaptery serve` and `adaptery worker` set it to
<data dir>/prometheus; a deployment gives every process the same folder), each process — the API, the
Celery worker and its pool processes — writes its counters and histograms to files there, and /metrics
sums them all (prometheus-client's multiprocess mode). Without it, /metrics shows the API process alone.
Gauges that describe state are not kept by any process but read when /metrics is scraped: jobs and
evaluations by status and the queue depth from the database (the truth), adapter residency and in-flight
requests from this process's serving engine (role api: from the inference replicas' last reported state, summed).
So a killed worker leaves no stale gauge behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response

from app.logs import from_the_api, route_template

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

HTTP_REQUESTS = Counter("adaptery_http_requests", "HTTP requests by route, method and status",
                        ["route", "method", "status"])
HTTP_SECONDS = Histogram("adaptery_http_request_duration_seconds",
                         "Time to the response's start (a stream's first bytes), by route and method",
                         ["route", "method"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
TRAINING_TOKENS = Counter("adaptery_training_tokens", "Tokens trained (rate() is training tokens/s), by base model",
                          ["base_model"])
TRAINING_STEPS = Counter("adaptery_training_steps", "Optimiser steps taken, by base model", ["base_model"])


async def record_http(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Middleware: count every request by its route template (not its path: ids would explode the labels)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        if not from_the_api(request, status):  # counted once, by the API process that took the client's request
            template = route_template(request) or "unmatched"
            HTTP_REQUESTS.labels(template, request.method, str(status)).inc()
            HTTP_SECONDS.labels(template, request.method).observe(time.perf_counter() - started)


class StateCollector(Collector):
    """Gauges read at scrape time: the database's jobs, evaluations and queue; the engine's adapters."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from app.db.models import Evaluation, FineTuningJob, JobStatus
        from app.db.session import session_scope

        jobs = GaugeMetricFamily("adaptery_jobs", "Fine-tuning jobs by status", labels=["status"])
        evaluations = GaugeMetricFamily("adaptery_evaluations", "Evaluations by status", labels=["status"])
        queue = GaugeMetricFamily("adaptery_queue_depth", "Work waiting for a worker (queued jobs and evaluations)")
        with session_scope() as session:
            job_counts = dict(session.execute(select(FineTuningJob.status, func.count())
                                              .group_by(FineTuningJob.status)).all())
            evaluation_counts = dict(session.execute(select(Evaluation.status, func.count())
                                                     .group_by(Evaluation.status)).all())
        for status in JobStatus:
            jobs.add_metric([status.value], job_counts.get(status.value, 0))
        for state, count in sorted(evaluation_counts.items()):
            evaluations.add_metric([str(state)], count)
        queue.add_metric([], job_counts.get(JobStatus.queued.value, 0) + evaluation_counts.get("queued", 0))
        yield from (jobs, evaluations, queue)
        yield from self._engine()

    def _engine(self) -> Iterator[GaugeMetricFamily]:
        from app.services.inference import engine_if_started

        engine = engine_if_started()  # never started by a scrape: the API imports torch only to serve
        if engine is not None:
            gauges = engine_gauges(engine)
        else:  # role api: what the inference replicas last reported (empty until the first poll)
            from app.services import routing

            gauges = routing.engine_gauges()
            if not gauges:
                return
        residency = GaugeMetricFamily("adaptery_adapters", "Adapters the serving engine has seen, by residency state",
                                      labels=["base_model", "state"])
        pinned = GaugeMetricFamily("adaptery_adapters_pinned", "Pinned adapters", labels=["base_model"])
        # Totals, not per adapter: an adapter's id is its tenant's, and anyone who can scrape would see them all.
        in_flight = GaugeMetricFamily("adaptery_adapter_requests_in_flight",
                                      "Requests queued or generating on an adapter", labels=["base_model"])
        adapters_busy = GaugeMetricFamily("adaptery_adapters_with_requests",
                                          "Adapters with requests queued or generating", labels=["base_model"])
        for name, values in sorted(gauges.items()):
            for state, count in sorted(values["adapters"].items()):
                residency.add_metric([name, state], count)
            pinned.add_metric([name], values["pinned"])
            in_flight.add_metric([name], values["in_flight"])
            adapters_busy.add_metric([name], values["busy"])
        yield from (residency, pinned, in_flight, adapters_busy)


def engine_gauges(engine: Any) -> dict[str, dict[str, Any]]:
    """Per base model served: adapters by residency state, pinned ones, requests in flight on adapters, adapters
    with requests. Scraped here, or reported to the API's router by an inference replica (/internal/state)."""
    from adapters.engine.residency import AdapterState

    out = {}
    for name, runtime in engine.runtimes().items():
        records = runtime.adapters.residencies()
        counts = {adapter: n for adapter, n in runtime.requests_in_flight().items() if adapter != "base"}
        out[name] = {"adapters": {state.value: sum(r.state == state for r in records) for state in AdapterState},
                     "pinned": sum(r.pinned for r in records), "in_flight": sum(counts.values()),
                     "busy": sum(n > 0 for n in counts.values())}
    return out


def render() -> Response:
    """The exposition text: every process's counters and histograms, and the state gauges."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:  # this process's own metrics
        from adapters import serving_metrics as serving

        for metric in (HTTP_REQUESTS, HTTP_SECONDS, TRAINING_TOKENS, TRAINING_STEPS, serving.GENERATED_TOKENS,
                       serving.PROMPT_TOKENS, serving.TIME_TO_FIRST_TOKEN, serving.INTER_TOKEN_LATENCY,
                       serving.DECODE_BATCH_SIZE, serving.ADAPTER_LOADS, serving.ADAPTER_LOAD_SECONDS,
                       serving.ADAPTER_EVICTIONS):
            registry.register(metric)
    registry.register(StateCollector())
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")
