"""The clients applications are built with, unchanged, against a running Adaptery (`make run`): the OpenAI SDK,
LangChain's ChatOpenAI, LlamaIndex's OpenAILike and instructor, each with sampling fields, logprobs, JSON output and
tools. They are not Adaptery's dependencies; in a virtual environment of their own:

    pip install openai langchain-openai llama-index-llms-openai-like instructor
    python examples/openai_clients.py data/bootstrap_key

docs/serving.md shows what it printed against SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

BASE = os.environ.get("ADAPTERY_URL", "http://127.0.0.1:8000/v1")
MODEL = os.environ.get("ADAPTERY_MODEL", "SmolLM2-135M-Instruct")
REVIEW = "Review: great value. Verdict?"
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
    "additionalProperties": False}}}


class Verdict(BaseModel):
    label: str = Field(json_schema_extra={"enum": ["POSITIVE", "NEGATIVE"]})
    confidence: int = Field(ge=0, le=100)


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"4 C and snowing in {city}"


def openai_sdk(key: str) -> None:
    from openai import OpenAI

    sdk = OpenAI(base_url=BASE, api_key=key)
    said = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5,
                                       n=2, seed=1, logprobs=True, top_logprobs=2, presence_penalty=0.5)
    print("n=2:", [c.message.content for c in said.choices],
          "first logprob:", said.choices[0].logprobs.content[0].logprob)  # type: ignore[union-attr,index]
    verdict = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": REVIEW}], max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "strict": True,
                                                                "schema": Verdict.model_json_schema()}})
    text = verdict.choices[0].message.content or ""
    print("json_schema:", text, "->", Verdict.model_validate_json(text))
    called = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                         max_tokens=120, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                         tool_choice="required")
    print("tools:", called.choices[0].finish_reason, called.choices[0].message.tool_calls)


def langchain(key: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=BASE, api_key=key, model=MODEL, max_tokens=120, temperature=0)  # type: ignore[arg-type]
    print("invoke:", repr(llm.invoke("Say hi").content))
    print("stream:", repr("".join(str(chunk.content) for chunk in llm.stream("Say hi"))))
    print("logprobs:", llm.bind(logprobs=True).invoke("Say hi").response_metadata["logprobs"]["content"][0])
    print("with_structured_output(json_schema):", llm.with_structured_output(Verdict, method="json_schema")
          .invoke(REVIEW))
    try:
        print("with_structured_output(json_mode):", llm.with_structured_output(Verdict, method="json_mode").invoke(
            "Review: great value. Give a JSON verdict with label and confidence."))
    except Exception as exc:  # json_object bounds nothing: a small model may write a long document
        print("with_structured_output(json_mode):", type(exc).__name__, str(exc)[:120])
    weather = tool(get_weather)
    called: Any = llm.bind_tools([weather], tool_choice="get_weather").invoke("Weather in Oslo?")
    print("bind_tools(tool_choice=get_weather):", called.tool_calls)
    streamed: Any = None
    for chunk in llm.bind_tools([weather], tool_choice="required").stream("Weather in Oslo?"):
        streamed = chunk if streamed is None else streamed + chunk
    print("bind_tools stream:", streamed.tool_calls)
    call = called.tool_calls[0]
    follow = llm.bind_tools([weather]).invoke([HumanMessage("Weather in Oslo?"), called,
                                               ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])])
    print("after the tool result:", repr(follow.content))


def llama_index(key: str) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(api_base=BASE, api_key=key, model=MODEL, is_chat_model=True, is_function_calling_model=True,
                     max_tokens=120, temperature=0, context_window=8192)
    hi = [ChatMessage(role="user", content="Say hi")]
    print("chat:", repr(str(llm.chat(hi).message.content)))
    print("stream_chat:", repr("".join(c.delta or "" for c in llm.stream_chat(hi))))
    answer = llm.chat_with_tools([FunctionTool.from_defaults(fn=get_weather)], user_msg="Weather in Oslo?",
                                 tool_required=True)
    print("chat_with_tools(tool_required):",
          [(t.tool_name, t.tool_kwargs) for t in llm.get_tool_calls_from_response(answer)])
    print("as_structured_llm:", llm.as_structured_llm(Verdict).chat([ChatMessage(role="user", content=REVIEW)]).raw)


def instructor_modes(key: str) -> None:
    import instructor
    from openai import OpenAI

    for mode in (instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS):
        client = instructor.from_openai(OpenAI(base_url=BASE, api_key=key), mode=mode)
        print(f"{mode.name}:", client.chat.completions.create(
            model=MODEL, response_model=Verdict, max_tokens=120, max_retries=0,
            messages=[{"role": "user", "content": REVIEW}]))


def main() -> None:
    key = Path(sys.argv[1] if len(sys.argv) > 1 else "data/bootstrap_key").read_text().strip()
    for name, run in (("OpenAI SDK", openai_sdk), ("LangChain ChatOpenAI", langchain),
                      ("LlamaIndex OpenAILike", llama_index), ("instructor", instructor_modes)):
        print(f"== {name}")
        run(key)


if __name__ == "__main__":
    main()
