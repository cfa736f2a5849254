"""The clients applications are built with, unchanged, against the app: LangChain's ChatOpenAI (invoke, stream,
with_structured_output with a pydantic model, bind_tools with tool_choice), LlamaIndex's OpenAILike and instructor's
JSON mode, each over this process's app (its TestClient is their HTTP client). On the tiny random model: every
structured answer here exists only because the engine constrained it. examples/openai_clients.py runs the same
clients against `make run` and the real model."""

# No `from __future__ import annotations`: the clients read get_weather's annotations at run time.

from typing import Any, Literal

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from tests.tiny_model import TINY_MODEL_ID

BASE = "http://testserver/v1"


class Verdict(BaseModel):
    # extra="forbid" makes pydantic's schema say additionalProperties: false; a client that does not send strict (as
    # instructor's JSON_SCHEMA mode) otherwise allows more keys, and the random model may add them until max_tokens.
    model_config = ConfigDict(extra="forbid")

    label: str = Field(json_schema_extra={"enum": ["POSITIVE", "NEGATIVE"]})
    confidence: int = Field(ge=0, le=100)


def get_weather(city: Literal["Oslo", "Paris"]) -> str:
    """The current weather in a city."""
    # A bounded parameter: the random model's free strings would run to max_tokens (a real model closes them).
    return f"4 C in {city}"


def key_of(client: TestClient) -> str:
    return client.headers["Authorization"].removeprefix("Bearer ")


def test_langchain_chat_openai(client: TestClient) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool

    llm = langchain_openai.ChatOpenAI(base_url=BASE, api_key=key_of(client), model=TINY_MODEL_ID, max_tokens=60,
                                      temperature=0, http_client=client, max_retries=0)
    said = llm.invoke("Say hi")
    assert isinstance(said.content, str) and said.content
    assert "".join(str(chunk.content) for chunk in llm.stream("Say hi")) == said.content
    verdict = llm.with_structured_output(Verdict, method="json_schema").invoke("Review: great value. Verdict?")
    assert isinstance(verdict, Verdict)
    called: Any = llm.bind_tools([tool(get_weather)], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert [call["name"] for call in called.tool_calls] == ["get_weather"]
    assert set(called.tool_calls[0]["args"]) == {"city"}


def test_llama_index_openai_like(client: TestClient) -> None:
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools import FunctionTool

    llm = openai_like.OpenAILike(api_base=BASE, api_key=key_of(client), model=TINY_MODEL_ID, is_chat_model=True,
                                 is_function_calling_model=True, max_tokens=60, temperature=0, context_window=8192,
                                 http_client=client, max_retries=0)
    said = llm.chat([ChatMessage(role="user", content="Say hi")])
    assert said.message.content
    answer = llm.chat_with_tools([FunctionTool.from_defaults(fn=get_weather)], user_msg="Weather in Oslo?",
                                 tool_required=True)
    calls = llm.get_tool_calls_from_response(answer)
    assert [(call.tool_name, set(call.tool_kwargs)) for call in calls] == [("get_weather", {"city"})]


def test_instructor_json_mode(client: TestClient) -> None:
    instructor = pytest.importorskip("instructor")
    from openai import OpenAI

    for mode in (instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS):
        patched = instructor.from_openai(OpenAI(base_url=BASE, api_key=key_of(client), http_client=client,
                                                max_retries=0), mode=mode)
        verdict = patched.chat.completions.create(model=TINY_MODEL_ID, response_model=Verdict, max_tokens=60,
                                                  max_retries=0, messages=[{"role": "user", "content": "Verdict?"}])
        assert isinstance(verdict, Verdict), mode
