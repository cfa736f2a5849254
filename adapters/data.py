"""Dataset formats: parse and check JSONL lines, and turn examples into token ids plus loss masks.

Torch-free on purpose: the API process uses the same parsing to validate uploads, so a file that
passes validation is exactly a file the worker can train on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FORMATS = ("chat", "completion", "instruction", "text")
Format = Literal["chat", "completion", "instruction", "text"]
CHAT_ROLES = ("system", "user", "assistant")
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
    if "messages" in keys:
        return "chat"
    if "prompt" in keys or "completion" in keys:
        return "completion"
    if "instruction" in keys or "output" in keys:
        return "instruction"
    if "text" in keys:
        return "text"
    return None


ALLOWED_KEYS: dict[str, set[str]] = {
    "chat": {"messages"},
    "completion": {"prompt", "completion"},
    "instruction": {"instruction", "input", "output"},
    "text": {"text"},
}


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def check_record(record: dict[str, Any], fmt: Format) -> str | None:
    """Return a message naming the problem with one example, or None if it is well formed."""
    unknown = set(record) - ALLOWED_KEYS[fmt]
    if unknown:
        return f"unknown field(s) {sorted(unknown)} for the {fmt} format (allowed: {sorted(ALLOWED_KEYS[fmt])})"
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list of {role, content} objects"
        has_assistant = False
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"messages[{i}] must be an object with 'role' and 'content'"
            extra = set(message) - {"role", "content", "weight", "name"}
            if extra:
                return f"messages[{i}] has unknown field(s) {sorted(extra)}"
            role = message.get("role")
            if role not in CHAT_ROLES:
                return f"messages[{i}].role is {role!r}; accepted roles: {', '.join(CHAT_ROLES)}"
            if not _nonempty_str(message.get("content")):
                return f"messages[{i}].content must be a non-empty string"
            weight = message.get("weight", 1)
            if isinstance(weight, bool) or weight not in (0, 1):
                return f"messages[{i}].weight must be 0 or 1"
            if role == "system" and i != 0:
                return f"messages[{i}]: a system message may only come first"
            if role == "assistant" and (i == 0 or messages[i - 1].get("role") == "system"):
                return f"messages[{i}]: an assistant message needs a user message before it"
            has_assistant = has_assistant or (role == "assistant" and message.get("weight", 1) == 1)
        if not has_assistant:
            return "'messages' needs at least one assistant message to learn from"
        return None
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
                                     "'instruction'+'output' or 'text'"))
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


def _render(tokenizer: ChatTokenizer, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)


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
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
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


def encode_dataset(tokenizer: ChatTokenizer, dataset: ParsedDataset) -> list[EncodedExample]:
    """Encode every record; a record the tokenizer or chat template rejects is a DatasetError for its line."""
    encoded, problems = [], []
    for number, record in zip(dataset.line_numbers, dataset.records, strict=True):
        try:
            encoded.append(encode_example(tokenizer, record, dataset.format))
        except Exception as exc:  # templates raise assorted errors (jinja, ValueError, TypeError)
            problems.append((number, f"cannot be encoded with the model's chat template: {exc}"))
    if problems:
        raise DatasetError(problems)
    return encoded


def length_stats(examples: list[EncodedExample], *, bins: int = 12) -> dict[str, Any]:
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


def check_lengths(examples: Iterable[EncodedExample], line_numbers: Iterable[int], *,
                  max_tokens: int) -> list[tuple[int, str]]:
    """Line-numbered problems for examples over the token limit."""
    problems = []
    for number, example in zip(line_numbers, examples, strict=True):
        if len(example.input_ids) > max_tokens:
            problems.append((number, f"{len(example.input_ids)} tokens; the limit is {max_tokens} per example"))
    return problems
