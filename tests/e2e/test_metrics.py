"""GET /metrics against the real API and worker: counts move as work happens, in the API process and in the
worker's (prometheus-client's multiprocess mode), and state gauges follow the database and the engine."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack, chat_lines, upload, wait_for_status
from tests.tiny_model import TINY_MODEL_ID


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape, which needs no key."""
    with httpx.Client(base_url=stack.base_url) as anonymous:
        response = anonymous.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_http_counts_by_route_template(stack: Stack, client: httpx.Client) -> None:
    before = scrape(stack)
    for _ in range(3):
        assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/fine_tuning/jobs/ftjob-nope").status_code == 404
    after = scrape(stack)
    models = {"route": "/v1/models", "method": "GET", "status": "200"}
    assert value(after, "adaptery_http_requests_total", **models) - \
        value(before, "adaptery_http_requests_total", **models) == 3
    # Labelled by the route's template, not the path: ids never become labels.
    missing = {"route": "/v1/fine_tuning/jobs/{fine_tuning_job_id}", "method": "GET", "status": "404"}
    assert value(after, "adaptery_http_requests_total", **missing) >= 1
    assert not any("ftjob-nope" in str(labels) for _, labels in after)
    seconds = {"route": "/v1/models", "method": "GET"}
    assert value(after, "adaptery_http_request_duration_seconds_count", **seconds) - \
        value(before, "adaptery_http_request_duration_seconds_count", **seconds) == 3


def test_training_and_serving_counts_move_with_the_work(stack: Stack, client: httpx.Client) -> None:
    before = scrape(stack)
    file_id = upload(client, chat_lines(8)).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": TINY_MODEL_ID, "training_file": file_id,
        "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}}}).json()
    done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    trained = scrape(stack)
    base = {"base_model": TINY_MODEL_ID}
    # Counted in the worker's pool process, summed by the API's /metrics.
    assert value(trained, "adaptery_training_tokens_total", **base) - \
        value(before, "adaptery_training_tokens_total", **base) == done["trained_tokens"]
    assert value(trained, "adaptery_training_steps_total", **base) - \
        value(before, "adaptery_training_steps_total", **base) == 4
    assert value(trained, "adaptery_jobs", status="succeeded") >= 1
    assert value(trained, "adaptery_queue_depth") >= 0

    answer = client.post("/v1/chat/completions", json={
        "model": done["fine_tuned_model"], "max_tokens": 5, "temperature": 0, "seed": 1,
        "messages": [{"role": "user", "content": "Say hi 1"}]})
    assert answer.status_code == 200, answer.text
    generated = answer.json()["usage"]["completion_tokens"]
    served = scrape(stack)
    assert value(served, "adaptery_inference_generated_tokens_total", **base) - \
        value(trained, "adaptery_inference_generated_tokens_total", **base) == generated
    assert value(served, "adaptery_time_to_first_token_seconds_count", **base) - \
        value(trained, "adaptery_time_to_first_token_seconds_count", **base) == 1
    assert value(served, "adaptery_decode_batch_size_count", **base) > \
        value(trained, "adaptery_decode_batch_size_count", **base) or generated <= 1
    assert value(served, "adaptery_adapter_loads_total", **base) >= 1
    assert value(served, "adaptery_adapter_load_seconds_count", **base) >= 1
    assert value(served, "adaptery_adapters", base_model=TINY_MODEL_ID, state="active") >= 1
