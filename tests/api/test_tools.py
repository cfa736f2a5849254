"""Tools in chat: offered functions, tool_choice (auto, none, required, a named function), parallel calls, calls read
into message.tool_calls and streamed as delta.tool_calls, and tool results sent back; on the tiny random model, whose
free text never calls a tool, so every forced call here is the constrained decoder's doing."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from adapters.tool_calls import call_prefix_length, chat_messages, parse_tool_calls
from tests.api.conftest import error_of
from tests.tiny_model import TINY_MODEL_ID

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "additionalProperties": False, "properties": {}}}}]
PARAMETERS = {"get_weather": WEATHER, "get_time": TOOLS[1]["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def chat(client: TestClient, **fields: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": TINY_MODEL_ID, "messages": ASK, "max_tokens": 80,
                                                      "tools": TOOLS, **fields})


def valid_calls(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    calls = []
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, PARAMETERS[call["function"]["name"]])
        calls.append((call["function"]["name"], arguments))
    return calls


def test_required_and_named_calls_are_always_valid(client: TestClient) -> None:
    one = chat(client, tool_choice="required", parallel_tool_calls=False, n=4, temperature=1.0, seed=3)
    assert one.status_code == 200, one.text
    for choice in one.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
        assert len(valid_calls(choice["message"])) == 1
    named = chat(client, tool_choice={"type": "function", "function": {"name": "get_weather"}}, n=4, temperature=1.0,
                 seed=4)
    assert named.status_code == 200, named.text
    for choice in named.json()["choices"]:
        assert [name for name, _ in valid_calls(choice["message"])] == ["get_weather"]
    parallel = chat(client, tool_choice="required", n=4, temperature=1.0, seed=5, max_tokens=120)
    for choice in parallel.json()["choices"]:
        if choice["finish_reason"] == "tool_calls":  # several calls may run to max_tokens; complete ones validate
            assert len(valid_calls(choice["message"])) >= 1


def test_a_forced_call_takes_the_declared_parameters_only(client: TestClient) -> None:
    """Parameters made from a Python function or a pydantic model leave additionalProperties out; a forced call's
    arguments are still the declared ones (a random model would otherwise add keys until max_tokens)."""
    open_tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "required": ["id"], "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}}}}}
    answer = chat(client, tools=[open_tool], tool_choice="required", parallel_tool_calls=False, n=4, temperature=1.0,
                  seed=6)
    for choice in answer.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        assert set(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])) == {"id"}


def test_auto_and_none_answer_text_when_the_model_calls_nothing(client: TestClient) -> None:
    for choice in ("auto", "none", None):
        answer = chat(client, **({"tool_choice": choice} if choice else {}), max_tokens=8, temperature=0)
        assert answer.status_code == 200, answer.text
        message = answer.json()["choices"][0]["message"]
        assert message.get("tool_calls") is None and isinstance(message["content"], str)


def test_a_streamed_call_arrives_as_delta_tool_calls(client: TestClient) -> None:
    body = {"model": TINY_MODEL_ID, "messages": ASK, "max_tokens": 80, "tools": TOOLS, "temperature": 1.0,
            "seed": 8, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    chunks = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        for line in streamed.iter_lines():
            if line.startswith("data: {"):
                chunks.extend(json.loads(line[6:])["choices"])
    calls = [call for c in chunks for call in c["delta"].get("tool_calls") or []]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]]
    assert calls[0]["index"] == 0 and not any(c["delta"].get("content") for c in chunks)
    assert chunks[-1]["finish_reason"] == "tool_calls"


def test_the_openai_sdk_calls_a_tool_and_sends_the_result_back(client: TestClient) -> None:
    openai = pytest.importorskip("openai")
    key = client.headers["Authorization"].removeprefix("Bearer ")
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)
    first = sdk.chat.completions.create(model=TINY_MODEL_ID, messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                        tool_choice="required", parallel_tool_calls=False, max_tokens=80, seed=1)
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])  # type: ignore[union-attr]
    follow_up = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = sdk.chat.completions.create(model=TINY_MODEL_ID, messages=follow_up, tools=TOOLS,  # type: ignore
                                         max_tokens=5, temperature=0)
    assert second.choices[0].message.content is not None


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not one of the tools"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "same name"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    ({"response_format": {"type": "json_object"}}, "parallel_tool_calls", "cannot be combined"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(a+)+"}}}}}],
      "tool_choice": "required"}, "tools[1].function.parameters", "regular expression"),
    ({"messages": [{"role": "tool", "content": "21"}]}, "messages[0]", "needs tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0]", "only on assistant"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_time", "arguments": "[1]"}}]}]}, "messages[0]", "not a JSON object"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0]", "content is required"),
])
def test_bad_tool_fields_are_a_400_naming_them(client: TestClient, fields: dict[str, Any], param: str,
                                               says: str) -> None:
    refused = chat(client, **fields)
    assert refused.status_code == 400, refused.text
    error = error_of(refused)
    assert error["param"].startswith(param) and says in error["message"], error


def test_calls_and_results_render_in_one_convention_and_are_read_back() -> None:
    """A template without tool support gets the tools in the system message, calls in the assistant's text and
    results as a user turn; what the model writes in that convention is read back, and anything else is text."""
    messages = [{"role": "system", "content": "Be brief."}, *ASK,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                    {"id": "c2", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris", "unit": "C"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
                {"role": "tool", "tool_call_id": "c2", "content": "21 C"}]
    plain, tools = chat_messages(messages, TOOLS, native=False)
    assert tools is None and [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in plain[0]["content"]
    assert plain[2]["content"] == ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n'
                                   '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>')
    assert plain[3]["content"] == "<tool_response>\n12:00\n</tool_response>\n<tool_response>\n21 C\n</tool_response>"
    names = {"get_time", "get_weather"}
    assert parse_tool_calls(plain[2]["content"], names) == (None, [
        parse_tool_calls(plain[2]["content"], names)[1][0],  # type: ignore[index]
        parse_tool_calls(plain[2]["content"], names)[1][1]])  # type: ignore[index]
    content, calls = parse_tool_calls("Let me check.\n" + plain[2]["content"], names)  # type: ignore[misc]
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_time", {}), ("get_weather", {"city": "Paris", "unit": "C"})]
    for text in ("no call here", '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>',
                 '<tool_call>\n{"name": "get_time", "arguments": [1]}\n</tool_call>', "<tool_call>\n{not json",
                 '<tool_call>\n{"name": "get_time", "arguments": {}}'):
        assert parse_tool_calls(text, names) is None, text
    assert call_prefix_length("Sure. <tool") == len("Sure. ") and call_prefix_length("a <b") == 4
    assert call_prefix_length("x<tool_call>y") == 1 and call_prefix_length("plain") == 5
