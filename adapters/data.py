"""Dataset formats: parse and check JSONL lines, and turn examples into token ids plus loss masks.

Torch-free on purpose: the API process uses the same parsing to validate uploads, so a file that
passes validation is exactly a file the worker can train on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from adapters.tool_calls import chat_messages, native_tools

FORMATS = ("chat", "completion", "instruction", "text", "preference", "feedback")
Format = Literal["chat", "completion", "instruction", "text", "preference", "feedback"]
# The formats a supervised job (and an evaluation) trains on; "preference" pairs are for preference objectives (DPO).
SUPERVISED_FORMATS = ("chat", "completion", "instruction", "text")
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_TOOLS = 128
MAX_REPORTED_PROBLEMS = 20


class DatasetError(ValueError):
    """A dataset that cannot be used; `problems` lists (line number, message) pairs, line 0 = whole file."""

    def __init__(self, problems: list[tuple[int, str]]):
        self.problems = problems
        super().__init__(describe_problems(problems))


def describe_problems(problems: list[tuple[int, str]]) -> str:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    parts = [f"line {n}: {msg}" if n else msg for n, msg in shown]
    more = len(problems) - len(shown)
    text = "; ".join(parts)
    if more > 0:
        text += f"; and {more} more problem(s)"
    return text


def detect_format(record: dict[str, Any]) -> Format | None:
    keys = set(record)
    if keys & {"preferred_output", "non_preferred_output"}:
        return "preference"
    if "label" in keys:
        return "feedback"
    if "messages" in keys:
        return "chat"
    if "prompt" in keys or "completion" in keys:
        return "completion"
    if "instruction" in keys or "output" in keys:
        return "instruction"
    if "text" in keys:
        return "text"
    if "input" in keys:
        return "preference"
    return None


ALLOWED_KEYS: dict[str, set[str]] = {
    "chat": {"messages", "tools", "parallel_tool_calls"},
    "completion": {"prompt", "completion"},
    "instruction": {"instruction", "input", "output"},
    "text": {"text"},
    # OpenAI's DPO format: {"input": {"messages", "tools"?}, "preferred_output": [answer], "non_preferred_output": [..]}
    "preference": {"input", "preferred_output", "non_preferred_output"},
    # One answer marked good (true) or bad (false): thumbs up / down, for KTO. Shaped as the preference lines.
    "feedback": {"input", "output", "label"},
}


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _check_tools(tools: Any) -> tuple[str | None, set[str]]:
    """(the problem with a line's `tools`, or None; the functions' names)."""
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        return f"'tools' must be a list of at most {MAX_TOOLS} {{type: function, function: {{name, ...}}}}", set()
    names: set[str] = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            return f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", set()
        if not _nonempty_str(function.get("name")) or function["name"] in names:
            return f"tools[{i}].function.name must be a non-empty string, different from the other tools'", set()
        if "parameters" in function and not isinstance(function["parameters"], dict):
            return f"tools[{i}].function.parameters must be a JSON Schema object", set()
        names.add(function["name"])
    return None, names


def _check_tool_calls(calls: Any, where: str, names: set[str] | None) -> str | None:
    if not isinstance(calls, list) or not calls:
        return f"{where}.tool_calls must be a non-empty list of calls"
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type") != "function" or not isinstance(function, dict) \
                or not _nonempty_str(call.get("id")):
            return (f"{where}.tool_calls[{j}] must be {{\"id\": ..., \"type\": \"function\", "
                    "\"function\": {\"name\": ..., \"arguments\": \"{...}\"}}")
        if not _nonempty_str(function.get("name")) or (names is not None and function["name"] not in names):
            return f"{where}.tool_calls[{j}].function.name must name one of the line's tools"
        text = function.get("arguments")
        try:
            arguments = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            return f"{where}.tool_calls[{j}].function.arguments must be a JSON object, as a string"
    return None


def _check_message(messages: list[Any], i: int, names: set[str] | None, where: str) -> str | None:
    """The problem with messages[i] (named `where` in the message), or None; weights are checked by the caller."""
    message = messages[i]
    if not isinstance(message, dict):
        return f"{where} must be an object with 'role' and 'content'"
    extra = set(message) - {"role", "content", "weight", "name", "tool_calls", "tool_call_id"}
    if extra:
        return f"{where} has unknown field(s) {sorted(extra)}"
    role = message.get("role")
    if role not in CHAT_ROLES:
        return f"{where}.role is {role!r}; accepted roles: {', '.join(CHAT_ROLES)}"
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            return f"{where}: only an assistant message has tool_calls"
        problem = _check_tool_calls(calls, where, names)
        if problem:
            return problem
        if message.get("content") is not None and not isinstance(message["content"], str):
            return f"{where}.content must be a string (or absent, beside tool_calls)"
    elif not _nonempty_str(message.get("content")):
        return f"{where}.content must be a non-empty string"
    if (role == "tool") != ("tool_call_id" in message):
        return f"{where}: tool_call_id is given on tool messages, and only there"
    if role == "tool":
        before = messages[i - 1] if i else {}
        if not _nonempty_str(message.get("tool_call_id")) or not (
                before.get("role") == "tool" or (before.get("role") == "assistant" and before.get("tool_calls"))):
            return f"{where}: a tool message answers the assistant's tool_calls just before it"
    if role == "system" and i != 0:
        return f"{where}: a system message may only come first"
    if role == "assistant" and (i == 0 or messages[i - 1].get("role") == "system"):
        return f"{where}: an assistant message needs a user message before it"
    return None


def _check_tool_fields(record: dict[str, Any], where: str) -> tuple[str | None, set[str] | None]:
    """(the problem with a conversation's `tools` and `parallel_tool_calls`, or None; the tools' names, None
    without tools)."""
    names: set[str] | None = None
    if "tools" in record:
        problem, names = _check_tools(record["tools"])
        if problem:
            return f"{where}{problem}", names
    if "parallel_tool_calls" in record and not isinstance(record["parallel_tool_calls"], bool):
        return f"{where}'parallel_tool_calls' must be true or false", names
    return None, names


def _check_chat(record: dict[str, Any]) -> str | None:
    problem, names = _check_tool_fields(record, "")
    if problem:
        return problem
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    has_assistant = False
    for i, message in enumerate(messages):
        problem = _check_message(messages, i, names, f"messages[{i}]")
        if problem:
            return problem
        weight = message.get("weight", 1)
        if isinstance(weight, bool) or weight not in (0, 1):
            return f"messages[{i}].weight must be 0 or 1"
        has_assistant = has_assistant or (message["role"] == "assistant" and weight == 1)
    if not has_assistant:
        return "'messages' needs at least one assistant message to learn from"
    return None


def _check_prompt(record: dict[str, Any]) -> tuple[str | None, list[Any], set[str] | None]:
    """(the problem with a preference or feedback line's `input`, or None; its messages; its tools' names)."""
    prompt = record.get("input")
    if not isinstance(prompt, dict) or "messages" not in prompt:
        return "'input' must be an object with 'messages' (and optionally 'tools')", [], None
    unknown = set(prompt) - {"messages", "tools", "parallel_tool_calls"}
    if unknown:
        return f"input has unknown field(s) {sorted(unknown)} (allowed: messages, tools, parallel_tool_calls)", [], None
    problem, names = _check_tool_fields(prompt, "input.")
    if problem:
        return problem, [], None
    messages = prompt["messages"]
    if not isinstance(messages, list) or not messages:
        return "input.messages must be a non-empty list of {role, content} objects", [], None
    for i in range(len(messages)):
        problem = _check_message(messages, i, names, f"input.messages[{i}]")
        if problem:
            return problem, [], None
        if "weight" in messages[i]:
            return f"input.messages[{i}]: weight belongs to supervised data; this line trains its outputs", [], None
    if messages[-1]["role"] not in ("user", "tool"):
        return "input.messages must end with a user (or tool) message: the outputs answer it", [], None
    return None, messages, names


def _check_answer(record: dict[str, Any], key: str, messages: list[Any], names: set[str] | None) -> str | None:
    output = record.get(key)
    if not isinstance(output, list) or len(output) != 1:
        return f"'{key}' must be a list of exactly one assistant message"
    answer = output[0]
    problem = _check_message([*messages, answer], len(messages), names, f"{key}[0]")
    if problem:
        return problem
    if answer["role"] != "assistant" or "weight" in answer:
        return f"{key}[0] must be an assistant message ({{\"role\": \"assistant\", ...}}), without weight"
    return None


def _check_preference(record: dict[str, Any]) -> str | None:
    """OpenAI's DPO line: a conversation that awaits the assistant's answer, and two answers to it."""
    problem, messages, names = _check_prompt(record)
    if problem:
        return problem
    for key in ("preferred_output", "non_preferred_output"):
        problem = _check_answer(record, key, messages, names)
        if problem:
            return problem
    if record["preferred_output"] == record["non_preferred_output"]:
        return "preferred_output and non_preferred_output are the same answer; a pair needs two different ones"
    return None


def _check_feedback(record: dict[str, Any]) -> str | None:
    """A feedback line: a conversation that awaits the assistant's answer, one answer, and whether it is good."""
    problem, messages, names = _check_prompt(record)
    if problem:
        return problem
    problem = _check_answer(record, "output", messages, names)
    if problem:
        return problem
    if not isinstance(record.get("label"), bool):
        return "'label' must be true (a good answer) or false (a bad one)"
    return None


def check_record(record: dict[str, Any], fmt: Format) -> str | None:
    """Return a message naming the problem with one example, or None if it is well formed."""
    unknown = set(record) - ALLOWED_KEYS[fmt]
    if unknown:
        return f"unknown field(s) {sorted(unknown)} for the {fmt} format (allowed: {sorted(ALLOWED_KEYS[fmt])})"
    if fmt == "chat":
        return _check_chat(record)
    if fmt == "preference":
        return _check_preference(record)
    if fmt == "feedback":
        return _check_feedback(record)
    if fmt == "completion":
        if not isinstance(record.get("prompt"), str):
            return "'prompt' must be a string"
        if not _nonempty_str(record.get("completion")):
            return "'completion' must be a non-empty string"
        return None
    if fmt == "instruction":
        if not _nonempty_str(record.get("instruction")):
            return "'instruction' must be a non-empty string"
        if "input" in record and not isinstance(record["input"], str):
            return "'input' must be a string when present"
        if not _nonempty_str(record.get("output")):
            return "'output' must be a non-empty string"
        return None
    if not _nonempty_str(record.get("text")):
        return "'text' must be a non-empty string"
    return None


@dataclass
class ParsedDataset:
    format: Format
    records: list[dict[str, Any]] = field(default_factory=list)
    # The file line each record came from (blank lines are skipped), for error messages.
    line_numbers: list[int] = field(default_factory=list)


def parse_jsonl(raw: bytes | Iterable[bytes], *, max_examples: int) -> ParsedDataset:
    """Parse and check a whole JSONL file, given whole or as its lines (a binary file object: the API validates an
    upload from its temporary file, never holding all its bytes); raise DatasetError naming every bad line (first
    20 shown)."""
    # Split on b"\n" only (as iterating a binary file does): str.splitlines() would also break inside JSON strings
    # at U+2028 and friends.
    lines = (line + b"\n" for line in raw.split(b"\n")) if isinstance(raw, bytes) else raw
    problems: list[tuple[int, str]] = []
    records: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    for number, raw_line in enumerate(lines, start=1):
        try:
            text_line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError([(number, f"not valid UTF-8 (byte offset {offset + exc.start}); files must be UTF-8 "
                                         "JSONL")]) from None
        offset += len(raw_line)
        if number == 1:
            text_line = text_line.removeprefix("\ufeff")
        text_line = text_line.removesuffix("\n").removesuffix("\r")
        if not text_line.strip():
            continue
        try:
            record = json.loads(text_line)
        except json.JSONDecodeError as exc:
            problems.append((number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            problems.append((number, "each line must be a JSON object"))
            continue
        records.append((number, record))
    if not records and not problems:
        raise DatasetError([(0, "the file is empty; expected one JSON object per line")])
    if len(records) > max_examples:
        problems.append((0, f"{len(records)} examples; at most {max_examples} are accepted per file"))

    formats: dict[Format, int] = {}
    for number, record in records:
        detected = detect_format(record)
        if detected is None:
            problems.append((number, "unrecognised example: expected 'messages' (chat), 'prompt'+'completion', "
                                     "'instruction'+'output', 'text', 'input'+'preferred_output'+"
                                     "'non_preferred_output' (preference pairs) or 'input'+'output'+'label' "
                                     "(feedback)"))
            continue
        formats.setdefault(detected, number)
    if len(formats) > 1:
        described = ", ".join(f"{name} (first on line {n})" for name, n in formats.items())
        problems.append((0, f"mixed formats in one file: {described}; use one format per file"))
    if not formats:
        raise DatasetError(sorted(problems))
    # Every example of the (first) format is checked even when other lines are broken, so one upload
    # reports every problem, in line order.
    fmt = next(iter(formats))
    for number, record in records:
        message = check_record(record, fmt) if detect_format(record) == fmt else None
        if message:
            problems.append((number, message))
    if problems:
        raise DatasetError(sorted(problems))
    return ParsedDataset(format=fmt, records=[r for _, r in records],
                         line_numbers=[n for n, _ in records])


class ChatTokenizer(Protocol):
    eos_token: str | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass
class EncodedExample:
    input_ids: list[int]
    # 1 where the token's prediction is trained on (assistant / completion / output / text tokens).
    loss_mask: list[int]


def _render(tokenizer: ChatTokenizer, messages: list[dict[str, Any]], generation_prompt: bool,
            tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as the model sees it, tools and tool calls in the convention serving uses (tool_calls.py)."""
    plain, template_tools = chat_messages(messages, tools, native=native_tools(tokenizer))
    extra = {"tools": template_tools} if template_tools else {}
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt, **extra)


def _segments(tokenizer: ChatTokenizer, record: dict[str, Any], fmt: Format) -> list[tuple[str, bool]]:
    """The example as (text, trained-on) pieces, in order."""
    eos = tokenizer.eos_token or ""
    if fmt == "completion":
        return [(record["prompt"], False), (record["completion"] + eos, True)]
    if fmt == "text":
        return [(record["text"] + eos, True)]
    if fmt == "instruction":
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        messages = record["messages"]
    tools = record.get("tools") if fmt == "chat" else None
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True, tools=tools)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False, tools=tools)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ValueError("the model's chat template does not render conversations incrementally")
        segments.append((prompt[len(rendered):], False))
        segments.append((full[len(prompt):], message.get("weight", 1) == 1))
        rendered = full
    return segments


def encode_example(tokenizer: ChatTokenizer, record: dict[str, Any], fmt: Format) -> EncodedExample:
    input_ids: list[int] = []
    loss_mask: list[int] = []
    for text, trained in _segments(tokenizer, record, fmt):
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        loss_mask.extend([1 if trained else 0] * len(ids))
    return EncodedExample(input_ids=input_ids, loss_mask=loss_mask)


@dataclass
class PreferencePair:
    """One preference line encoded: the prompt followed by the preferred answer, and by the other one, each trained
    on its answer's tokens only."""

    chosen: EncodedExample
    rejected: EncodedExample

    # The two sequences one after the other: what the pair costs where examples are counted in tokens (memory
    # plans, data-parallel shares, trained tokens, length checks). Both always go into the same forward pass.
    @property
    def input_ids(self) -> list[int]:
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def loss_mask(self) -> list[int]:
        return self.chosen.loss_mask + self.rejected.loss_mask


def encode_pair(tokenizer: ChatTokenizer, record: dict[str, Any]) -> PreferencePair:
    """A preference line as two conversations that share the prompt: the answers rendered through the chat template
    as an assistant turn, exactly as a supervised chat example's would be."""
    prompt = record["input"]
    conversation = {k: v for k, v in prompt.items() if k != "messages"}
    return PreferencePair(*(encode_example(tokenizer, {**conversation, "messages": [*prompt["messages"], *answer]},
                                           "chat")
                            for answer in (record["preferred_output"], record["non_preferred_output"])))


@dataclass
class FeedbackExample:
    """One feedback line encoded: the prompt and the answer (trained on the answer's tokens), whether the answer is
    good, and where the answer starts (KTO pairs each prompt with another line's answer to estimate the KL term)."""

    example: EncodedExample
    desirable: bool
    prompt_length: int

    @property
    def input_ids(self) -> list[int]:
        return self.example.input_ids

    @property
    def loss_mask(self) -> list[int]:
        return self.example.loss_mask

    def with_answer_of(self, other: FeedbackExample) -> EncodedExample:
        """This prompt followed by `other`'s answer: a mismatched sequence (KTO's KL estimate)."""
        answer = other.example.input_ids[other.prompt_length:]
        return EncodedExample(input_ids=self.example.input_ids[:self.prompt_length] + answer,
                              loss_mask=[0] * self.prompt_length + [1] * len(answer))


def encode_feedback(tokenizer: ChatTokenizer, record: dict[str, Any]) -> FeedbackExample:
    prompt = record["input"]
    conversation = {k: v for k, v in prompt.items() if k != "messages"}
    example = encode_example(tokenizer, {**conversation, "messages": [*prompt["messages"], *record["output"]]}, "chat")
    prompt_length = example.loss_mask.index(1) if 1 in example.loss_mask else len(example.loss_mask)
    return FeedbackExample(example=example, desirable=record["label"], prompt_length=prompt_length)


Encoded = TypeVar("Encoded", EncodedExample, PreferencePair, FeedbackExample)


def _encode_each(dataset: ParsedDataset, encode: Callable[[dict[str, Any]], Encoded]) -> list[Encoded]:
    encoded, problems = [], []
    for number, record in zip(dataset.line_numbers, dataset.records, strict=True):
        try:
            encoded.append(encode(record))
        except Exception as exc:  # templates raise assorted errors (jinja, ValueError, TypeError)
            problems.append((number, f"cannot be encoded with the model's chat template: {exc}"))
    if problems:
        raise DatasetError(problems)
    return encoded


def encode_dataset(tokenizer: ChatTokenizer, dataset: ParsedDataset) -> list[EncodedExample]:
    """Encode every record of a supervised format; a record the tokenizer or chat template rejects is a
    DatasetError for its line."""
    if dataset.format not in SUPERVISED_FORMATS:
        raise DatasetError([(0, f"a file in the {dataset.format} format is for a preference job; this takes one of "
                                f"{', '.join(SUPERVISED_FORMATS)}")])
    return _encode_each(dataset, lambda record: encode_example(tokenizer, record, dataset.format))


def encode_pairs(tokenizer: ChatTokenizer, dataset: ParsedDataset) -> list[PreferencePair]:
    """Encode every line of a preference file (DatasetError naming the lines that cannot be)."""
    if dataset.format != "preference":
        raise DatasetError([(0, f"a file in the {dataset.format} format has no preference pairs; a dpo job takes "
                                "lines {\"input\": ..., \"preferred_output\": [..], \"non_preferred_output\": [..]}")])
    return _encode_each(dataset, lambda record: encode_pair(tokenizer, record))


def encode_any(tokenizer: ChatTokenizer, dataset: ParsedDataset
               ) -> list[EncodedExample] | list[PreferencePair] | list[FeedbackExample]:
    """What an upload is checked with: supervised examples, preference pairs or feedback examples, by format."""
    if dataset.format == "preference":
        return encode_pairs(tokenizer, dataset)
    if dataset.format == "feedback":
        return _encode_each(dataset, lambda record: encode_feedback(tokenizer, record))
    return encode_dataset(tokenizer, dataset)


def length_stats(examples: list[EncodedExample] | list[PreferencePair] | list[FeedbackExample], *,
                 bins: int = 12) -> dict[str, Any]:
    """What a person checks before training on a file: example lengths in tokens (range, mean, median, 95th
    percentile and a histogram of equal-width bins from 0) and how many tokens are trained on."""
    lengths = sorted(len(e.input_ids) for e in examples)
    if not lengths:
        return {}
    width = max(1, math.ceil(lengths[-1] / bins))
    counts = [0] * bins
    for length in lengths:
        counts[min(bins - 1, length // width)] += 1
    return {"min_tokens": lengths[0], "max_tokens": lengths[-1], "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "p50_tokens": lengths[(len(lengths) - 1) // 2], "p95_tokens": lengths[math.ceil(0.95 * len(lengths)) - 1],
            "trained_tokens": sum(sum(e.loss_mask) for e in examples),
            "length_histogram": {"bin_edges": [i * width for i in range(bins + 1)], "counts": counts}}


def check_lengths(examples: Iterable[EncodedExample | PreferencePair | FeedbackExample], line_numbers: Iterable[int], *,
                  max_tokens: int) -> list[tuple[int, str]]:
    """Line-numbered problems for examples over the token limit."""
    problems = []
    for number, example in zip(line_numbers, examples, strict=True):
        if len(example.input_ids) > max_tokens:
            problems.append((number, f"{len(example.input_ids)} tokens; the limit is {max_tokens} per example"))
    return problems
