"""The OpenAI inference routes in this process, on the tiny model the app serves itself: refusals name the field,
and a seeded sample is the same twice."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.api.conftest import error_of
from tests.tiny_model import TINY_MODEL_ID


def test_inference_errors(client: TestClient) -> None:
    unknown = client.post("/v1/chat/completions", json={"model": "ft:nope:x", "messages": [
        {"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "model_not_found"
    bad_role = client.post("/v1/chat/completions", json={"model": TINY_MODEL_ID, "messages": [
        {"role": "robot", "content": "hi"}]})
    assert bad_role.status_code == 400 and error_of(bad_role)["param"] == "messages[0].role"
    too_long = client.post("/v1/completions", json={"model": TINY_MODEL_ID, "prompt": "hi", "max_tokens": 10**6})
    assert too_long.status_code == 400 and error_of(too_long)["param"] == "max_tokens"
    sampled = {"model": TINY_MODEL_ID, "prompt": "Once upon", "max_tokens": 5, "temperature": 0.8, "top_p": 0.9,
               "seed": 3}
    completion = client.post("/v1/completions", json=sampled)
    assert completion.status_code == 200, completion.text
    body = completion.json()
    assert body["object"] == "text_completion" and 0 < body["usage"]["completion_tokens"] <= 5
    again = client.post("/v1/completions", json=sampled).json()
    assert again["choices"][0]["text"] == body["choices"][0]["text"]  # same seed, same sample
