"""Tool calling in chat: how tools, assistant tool calls and tool results become a model's prompt text, and how the
tool calls in a generated answer are read back. Torch-free: training data and serving render through the same code,
so a model fine-tuned on tool calls is served with the convention it learned.

The convention is Hermes' (Qwen2/2.5/3, SmolLM3 and Hermes models use it): a call is
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, a result comes back in `<tool_response>` tags. A
model whose chat template renders tools in that convention is given the tools and messages through its template; any
other model gets the same convention in plain messages (the tools described in the system message, calls in the
assistant's text, results as user turns), so every model can be taught and asked to call tools the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
RESPONSE_OPEN = "<tool_response>"
RESPONSE_CLOSE = "</tool_response>"
# Compact JSON with the separators the constrained decoder writes (adapters/engine/grammar.py).
SEPARATORS = (", ", ": ")
TOOLS_PREAMBLE = (
    "You may call one or more functions to help with the user's request. The functions are described here, one JSON "
    "object per line:\n{tools}\nTo call a function, answer with one block per call, in this form:\n"
    + CALL_OPEN + '\n{{"name": <function name>, "arguments": <the arguments as a JSON object>}}\n' + CALL_CLOSE)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)


def call_block(name: str, arguments: Any) -> str:
    """One call as the model writes it; `arguments` is a JSON object or its text."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, separators=SEPARATORS)}\n{CALL_CLOSE}"


def native_tools(tokenizer: Any) -> bool:
    """The model's chat template renders tools, and in the Hermes convention this module reads back."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template and CALL_OPEN in template


def _arguments(call: dict[str, Any]) -> Any:
    arguments = call["function"].get("arguments") or "{}"
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def chat_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *, native: bool
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """OpenAI-shaped messages (role, content, tool_calls, tool_call_id) and tools, as the (messages, tools) to give
    the chat template: unchanged in shape for a template with tool support, else in plain messages."""
    if native:
        shaped = []
        for message in messages:
            item = {"role": message["role"], "content": message.get("content") or ""}
            if message.get("tool_calls"):
                item["tool_calls"] = [{"type": "function", "function": {
                    "name": call["function"]["name"], "arguments": _arguments(call)}} for call in message["tool_calls"]]
            if message["role"] == "tool":
                item["tool_call_id"] = message.get("tool_call_id")
            shaped.append(item)
        return shaped, tools or None
    plain: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if message.get("tool_calls"):
            calls = "\n".join(call_block(call["function"]["name"], _arguments(call)) for call in message["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        if role == "tool":
            role, content = "user", f"{RESPONSE_OPEN}\n{content}\n{RESPONSE_CLOSE}"
            if plain and plain[-1]["role"] == "user" and plain[-1]["content"].startswith(RESPONSE_OPEN):
                plain[-1]["content"] += f"\n{content}"  # parallel results: one turn, as Hermes templates render them
                continue
        plain.append({"role": role, "content": content})
    if tools:
        described = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(tool, separators=SEPARATORS) for tool in tools))
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": f"{plain[0]['content']}\n\n{described}"}
        else:
            plain.insert(0, {"role": "system", "content": described})
    return plain, None


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]] | None:
    """The (content, calls) of an answer that calls tools: each block must hold {"name": one of `names`,
    "arguments": an object}; text outside the blocks is the content (None when there is none). None when the answer
    holds no block, or one that is not a valid call (it is then plain text)."""
    calls: list[ToolCall] = []
    outside: list[str] = []
    position = 0
    while True:
        start = text.find(CALL_OPEN, position)
        if start < 0:
            break
        end = text.find(CALL_CLOSE, start)
        if end < 0:
            return None
        outside.append(text[position:start])
        try:
            call = json.loads(text[start + len(CALL_OPEN):end])
        except ValueError:
            return None
        if not (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments"), dict)):
            return None
        calls.append(ToolCall(name=call["name"], arguments=json.dumps(call["arguments"], separators=SEPARATORS)))
        position = end + len(CALL_CLOSE)
    if not calls:
        return None
    content = "".join([*outside, text[position:]]).strip()
    return content or None, calls


def call_prefix_length(text: str) -> int:
    """Where in `text` a tool call starts or may be starting (the first `<tool_call>`, or a trailing prefix of it);
    len(text) when none can: what a stream may send as content before it knows."""
    found = text.find(CALL_OPEN)
    if found >= 0:
        return found
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(CALL_OPEN[:size]):
            return len(text) - size
    return len(text)
