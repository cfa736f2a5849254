"""Structured output: response_format json_object and json_schema by constrained decoding, on the tiny random model
(whose free text is never JSON), per row of a mixed batch; schemas the server does not run are refused naming
where they are."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from tests.adapters.test_engine import scheduler_paused
from tests.api.adapters_made_with_peft import files_of, save_lora, send_files
from tests.api.conftest import error_of
from tests.api.test_inference import _runtime, _until
from tests.budgets import UNLESS_BROKEN, budget
from tests.tiny_model import TINY_MODEL_ID

# Every value bounded (string lengths, the integer's range, the array's length), so a document always closes
# within the token budget whatever the model samples.
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "mood", "tags", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "mood": {"enum": ["happy", "sad"]}, "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}}}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


def chat_body(response_format: dict[str, Any] | None, model: str = TINY_MODEL_ID, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": 120, **fields}
    if response_format is not None:
        body["response_format"] = response_format
    return body


def valid_person(text: str) -> dict[str, Any]:
    document = json.loads(text)
    jsonschema.validate(document, PERSON)
    return dict(document)


def test_every_json_schema_answer_validates_in_a_mixed_batch_and_free_rows_are_unchanged(  # 8 rows: the tenant limit
        client: TestClient, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Sampled choices (n=4 and n=2, temperature 1) of a schema on the base model and on an adapter, a json_object
    row and a free-text row decode in one batch: every constrained answer parses and validates and ends with "stop",
    while the free-text row is exactly what it is alone (a row's mask never reaches another row)."""
    sent = send_files(client, files_of(save_lora(tiny_model_dir, tmp_path / "lora", seed=3)))
    assert sent.status_code == 200, sent.text
    adapter = sent.json()["id"]
    assert client.post("/v1/chat/completions", json=chat_body(None, model=adapter, max_tokens=1)).status_code == 200
    free = chat_body(None, max_tokens=20, temperature=1.0, seed=5)
    alone = client.post("/v1/chat/completions", json=free).json()["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(alone)  # the model does not write JSON by itself
    requests = {"schema": chat_body(PERSON_FORMAT, n=4, temperature=1.0, seed=11),
                "adapter": chat_body(PERSON_FORMAT, model=adapter, n=2, temperature=1.0, seed=12),
                "object": chat_body({"type": "json_object"}, temperature=0, max_tokens=40),
                "free": free}
    answers: dict[str, Any] = {}

    def run(name: str) -> None:
        answers[name] = client.post("/v1/chat/completions", json=requests[name])

    runtime = _runtime()
    with scheduler_paused(runtime):
        threads = [threading.Thread(target=run, args=(name,)) for name in requests]
        for thread in threads:
            thread.start()
        assert _until(lambda: len(runtime.pending) == 8, budget(10))
    for thread in threads:
        thread.join(timeout=UNLESS_BROKEN)
    for name, response in answers.items():
        assert response.status_code == 200, (name, response.text)
    people = [choice for name in ("schema", "adapter") for choice in answers[name].json()["choices"]]
    assert len(people) == 6
    documents = [valid_person(choice["message"]["content"]) for choice in people]
    assert all(choice["finish_reason"] == "stop" for choice in people)
    assert len({json.dumps(d, sort_keys=True) for d in documents}) > 1, documents  # sampled, not one forced answer
    greedy = answers["object"].json()["choices"][0]
    if greedy["finish_reason"] == "stop":  # json_object bounds nothing: a long string may reach max_tokens
        assert isinstance(json.loads(greedy["message"]["content"]), dict)
    assert answers["free"].json()["choices"][0]["message"]["content"] == alone


def test_a_streamed_json_schema_answer_is_the_same_document(client: TestClient) -> None:
    body = chat_body(PERSON_FORMAT, temperature=1.0, seed=21, logprobs=True, top_logprobs=2)
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    valid_person(whole["message"]["content"])
    # The logprobs are over the tokens the schema allowed: every reported alternative was possible.
    assert all(item["logprob"] > float("-inf") and all(t["logprob"] > float("-inf") for t in item["top_logprobs"])
               for item in whole["logprobs"]["content"])
    text = ""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        for line in streamed.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    assert text == whole["message"]["content"]


def test_strict_closes_objects_that_do_not_say_as_openai_does(client: TestClient) -> None:
    """A pydantic model's schema leaves additionalProperties out; with strict the answer holds the declared keys
    only, without strict JSON Schema's default (more keys allowed) stands."""
    schema = {"type": "object", "required": ["label"], "properties": {"label": {"enum": ["POSITIVE", "NEGATIVE"]}}}
    for seed in range(3):
        answer = client.post("/v1/chat/completions", json=chat_body({"type": "json_schema", "json_schema": {
            "name": "verdict", "schema": schema, "strict": True}}, temperature=1.0, seed=seed)).json()
        assert set(json.loads(answer["choices"][0]["message"]["content"])) == {"label"}, answer
    from adapters.engine.grammar import closed_objects

    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}, "b": {
        "type": "object", "additionalProperties": True}}, "$defs": {"c": {"properties": {}}},
        "enum": [{"properties": 1}]}
    assert closed_objects(nested) == {
        "type": "object", "additionalProperties": False, "properties": {
            "a": {"type": "object", "properties": {}, "additionalProperties": False},
            "b": {"type": "object", "additionalProperties": True}},
        "$defs": {"c": {"properties": {}, "additionalProperties": False}}, "enum": [{"properties": 1}]}


def test_text_is_the_default_format(client: TestClient) -> None:
    answer = client.post("/v1/chat/completions", json=chat_body({"type": "text"}, max_tokens=2))
    assert answer.status_code == 200, answer.text


def test_names_that_look_like_keywords_are_data(client: TestClient) -> None:
    """A property called "pattern" is a name, not the regex keyword; a const holding one is data."""
    schema = {"type": "object", "additionalProperties": False, "required": ["pattern"],
              "properties": {"pattern": {"const": {"pattern": "a+"}}}}
    answer = client.post("/v1/chat/completions", json=chat_body(
        {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}, temperature=0))
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["choices"][0]["message"]["content"]) == {"pattern": {"pattern": "a+"}}


@pytest.mark.parametrize(("response_format", "param", "says"), [
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"id": {"type": "string", "pattern": "^(a+)+$"}}}}},
     "response_format.json_schema.schema", "schema.properties.id.pattern is a regular expression"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "patternProperties": {"^x": {"type": "string"}}}}},
     "response_format.json_schema.schema", "schema.patternProperties is a regular expression"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "x-guidance": {"whitespace_pattern": "(a|a)*"}}}},
     "response_format.json_schema.schema", "the server's to choose"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "person"}}},
     "response_format.json_schema.schema", "schema cannot be used"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {  # no guarantee the engine could keep
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}},
     "response_format.json_schema.schema", "Unimplemented keys: [\"uniqueItems\"]"),
    ({"type": "json_schema"}, "response_format", "needs json_schema"),
    ({"type": "json_object", "json_schema": {"name": "p"}}, "response_format", "only with type"),
    ({"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}},
     "response_format.json_schema.name", "pattern"),
    ({"type": "xml"}, "response_format.type", "json_schema"),
])
def test_schemas_the_server_does_not_run_are_a_400_naming_where(client: TestClient, response_format: dict[str, Any],
                                                                 param: str, says: str) -> None:
    refused = client.post("/v1/chat/completions", json=chat_body(response_format))
    assert refused.status_code == 400, refused.text
    error = error_of(refused)
    assert error["param"] == param and says in error["message"], error


def test_a_schema_nested_past_the_limit_is_refused_not_a_500(client: TestClient) -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(80):
        schema = {"type": "array", "items": schema}
    refused = client.post("/v1/chat/completions", json=chat_body(
        {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}))
    assert refused.status_code == 400 and "nested more than 64 levels" in error_of(refused)["message"]
