"""Dataset parsing/validation (parse_jsonl) and encoding into token ids + loss masks (real SmolLM2 tokenizer)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from adapters.data import (
    MAX_REPORTED_PROBLEMS,
    DatasetError,
    EncodedExample,
    check_lengths,
    check_record,
    encode_dataset,
    encode_example,
    length_stats,
    parse_jsonl,
)

EOS = "<|im_end|>"


def jsonl(*lines: Any) -> bytes:
    """A JSONL file: dicts/lists are dumped, strings are written as-is (blank lines, broken JSON)."""
    return ("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n").encode()


def chat(*turns: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


GOOD_CHAT = chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))
# OpenAI's fine-tuning format for function calling: a call, its result, and the answer that uses it.
TOOL_CHAT = {"tools": [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}],
             "parallel_tool_calls": False,
             "messages": [{"role": "user", "content": "USERQ time?"},
                          {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                              "name": "get_time", "arguments": "{\"zone\": \"UTC\"}"}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "TOOLRESULT 12:00"},
                          {"role": "assistant", "content": "ANSWER noon."}]}
GOOD_COMPLETION = {"prompt": "2+2=", "completion": "4"}
GOOD_INSTRUCTION = {"instruction": "Translate to French", "input": "cat", "output": "chat"}
GOOD_TEXT = {"text": "Some plain text."}

# ------------------------------------------------------------------ parse_jsonl: good files

GOOD_FILES = [
    pytest.param(jsonl(GOOD_CHAT, chat(("user", "a"), ("assistant", "b"))), "chat", [1, 2], id="chat"),
    pytest.param(jsonl(chat(("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2"))),
                 "chat", [1], id="chat-multi-turn"),
    pytest.param(jsonl({"messages": [{"role": "user", "content": "q", "name": "bob"},
                                     {"role": "assistant", "content": "skip", "weight": 0},
                                     {"role": "user", "content": "q2"},
                                     {"role": "assistant", "content": "a2", "weight": 1}]}),
                 "chat", [1], id="chat-weights-and-name"),
    pytest.param(jsonl(GOOD_COMPLETION, {"prompt": "", "completion": "x"}), "completion", [1, 2], id="completion"),
    pytest.param(jsonl(GOOD_INSTRUCTION, GOOD_INSTRUCTION, GOOD_INSTRUCTION), "instruction", [1, 2, 3],
                 id="instruction-with-input"),
    pytest.param(jsonl({"instruction": "Say hi", "output": "hi"},
                       {"instruction": "Say hi", "input": "", "output": "hi"}),
                 "instruction", [1, 2], id="instruction-without-input"),
    pytest.param(jsonl(GOOD_TEXT), "text", [1], id="text"),
    pytest.param(jsonl("", GOOD_TEXT, "   ", "\t", GOOD_TEXT, ""), "text", [2, 5], id="blank-lines-skipped"),
    pytest.param(b"\xef\xbb\xbf" + jsonl(GOOD_COMPLETION, GOOD_COMPLETION), "completion", [1, 2], id="utf8-bom"),
    pytest.param(jsonl(GOOD_TEXT, GOOD_TEXT).replace(b"\n", b"\r\n"), "text", [1, 2], id="crlf"),
    pytest.param(json.dumps(GOOD_TEXT).encode(), "text", [1], id="no-trailing-newline"),
    pytest.param(jsonl({"text": "caf\u00e9 \u2603 \U0001f600"}), "text", [1], id="non-ascii"),
]


@pytest.mark.parametrize(("raw", "fmt", "line_numbers"), GOOD_FILES)
def test_parse_good_files(raw: bytes, fmt: str, line_numbers: list[int]) -> None:
    dataset = parse_jsonl(raw, max_examples=100)
    assert dataset.format == fmt
    assert dataset.line_numbers == line_numbers
    assert len(dataset.records) == len(line_numbers)
    lines = raw.decode("utf-8-sig").splitlines()
    assert dataset.records == [json.loads(lines[n - 1]) for n in line_numbers]


def test_max_examples_is_inclusive() -> None:
    assert len(parse_jsonl(jsonl(GOOD_TEXT, GOOD_TEXT), max_examples=2).records) == 2


# ------------------------------------------------------------------ parse_jsonl: bad files

MAX_EXAMPLES = 5  # max_examples for the bad-file table (no other case there has more records)
# (raw, problem line numbers (0 = whole file), substrings every one of which the message must contain)
BAD_FILES = [
    pytest.param(jsonl(GOOD_TEXT, "", GOOD_TEXT) + b'{"text": "bad \xff byte"}\n', [4],
                 ["line 4: not valid UTF-8", "UTF-8"], id="not-utf8"),
    pytest.param(jsonl(GOOD_TEXT, '{"text": "unterminated', GOOD_TEXT, "{'text': 'single quotes'}"), [2, 4],
                 ["line 2: not valid JSON", "line 4: not valid JSON"], id="not-json"),
    pytest.param(jsonl(GOOD_TEXT, "", [GOOD_TEXT]), [3], ["line 3: each line must be a JSON object"],
                 id="json-array-line"),
    pytest.param(jsonl(GOOD_TEXT, '"just a string"', "42"), [2, 3],
                 ["line 2: each line must be a JSON object", "line 3: each line must be a JSON object"],
                 id="json-scalar-lines"),
    pytest.param(b"", [0], ["empty"], id="empty-file"),
    pytest.param(b"\n  \n\r\n", [0], ["empty"], id="only-blank-lines"),
    pytest.param(b"\xef\xbb\xbf", [0], ["empty"], id="only-bom"),
    pytest.param(jsonl(GOOD_CHAT, "", GOOD_TEXT, GOOD_CHAT, GOOD_COMPLETION, GOOD_TEXT), [0],
                 ["mixed formats", "chat (first on line 1)", "text (first on line 3)",
                  "completion (first on line 5)"], id="mixed-formats"),
    pytest.param(jsonl(GOOD_TEXT, {"foo": "bar"}), [2], ["line 2: unrecognised example"], id="unrecognised"),
    pytest.param(jsonl(*[GOOD_TEXT] * 3, "", *[GOOD_TEXT] * 3), [0],
                 [f"{MAX_EXAMPLES + 1} examples", f"at most {MAX_EXAMPLES} are accepted"], id="over-max-examples"),
    # --- chat
    pytest.param(jsonl(GOOD_CHAT, {"messages": []}), [2], ["line 2:", "'messages' must be a non-empty list"],
                 id="chat-empty-messages"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": "hi"}), [2], ["line 2:", "'messages' must be a non-empty list"],
                 id="chat-messages-not-list"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": ["hi"]}), [2], ["line 2: messages[0] must be an object"],
                 id="chat-message-not-object"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}), [2],
                 ["line 2: messages[0].content must be a non-empty string"], id="chat-missing-content"),
    pytest.param(jsonl(GOOD_CHAT, chat(("user", "q"), ("assistant", "  "))), [2],
                 ["line 2: messages[1].content must be a non-empty string"], id="chat-blank-content"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [{"role": "user", "content": 5}, {"role": "assistant",
                                                                                  "content": "a"}]}),
                 [2], ["line 2: messages[0].content must be a non-empty string"], id="chat-content-not-string"),
    pytest.param(jsonl(GOOD_CHAT, chat(("user", "q"), ("bot", "a"))), [2],
                 ["line 2: messages[1].role is 'bot'", "accepted roles: system, user, assistant"],
                 id="chat-wrong-role"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}), [2],
                 ["line 2: messages[0].role is None", "accepted roles: system, user, assistant"],
                 id="chat-missing-role"),
    pytest.param(jsonl(GOOD_CHAT, chat(("system", "s"), ("user", "q"))), [2],
                 ["line 2:", "at least one assistant message"], id="chat-no-assistant"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a", "weight": 0}]}), [2],
                 ["line 2:", "at least one assistant message"], id="chat-only-weight-0-assistant"),
    pytest.param(jsonl(GOOD_CHAT, chat(("user", "q"), ("system", "s"), ("assistant", "a"))), [2],
                 ["line 2: messages[1]: a system message may only come first"], id="chat-system-not-first"),
    pytest.param(jsonl(GOOD_CHAT, chat(("user", "q"), ("assistant", "a"), id="x1")), [2],
                 ["line 2: unknown field(s) ['id'] for the chat format"], id="chat-unknown-field"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [{"role": "user", "content": "q", "function_call": {}},
                                                {"role": "assistant", "content": "a"}]}), [2],
                 ["line 2: messages[0] has unknown field(s) ['function_call']"], id="chat-message-unknown-field"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [{"role": "user", "content": "q", "tool_calls": []},
                                                {"role": "assistant", "content": "a"}]}), [2],
                 ["line 2: messages[0]: only an assistant message has tool_calls"], id="tool-calls-on-user"),
    pytest.param(jsonl(GOOD_CHAT, {**TOOL_CHAT, "tools": [{"type": "function", "function": {"name": "other"}}]}), [2],
                 ["line 2: messages[1].tool_calls[0].function.name must name one of the line's tools"],
                 id="tool-call-of-an-unknown-function"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [TOOL_CHAT["messages"][0], {**TOOL_CHAT["messages"][1], "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "[]"}}]}]}), [2],
                 ["line 2: messages[1].tool_calls[0].function.arguments must be a JSON object, as a string"],
                 id="tool-call-arguments-not-an-object"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [{"role": "user", "content": "q"},
                                                {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
                                                {"role": "assistant", "content": "a"}]}), [2],
                 ["line 2: messages[1]: a tool message answers the assistant's tool_calls just before it"],
                 id="tool-result-without-a-call"),
    pytest.param(jsonl(GOOD_CHAT, {**TOOL_CHAT, "tools": [{"type": "function", "function": {"name": "get_time"}},
                                                         {"type": "function", "function": {"name": "get_time"}}]}),
                 [2], ["line 2: tools[1].function.name must be a non-empty string, different from the other tools'"],
                 id="tools-with-one-name-twice"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a", "weight": 2}]}), [2],
                 ["line 2: messages[1].weight must be 0 or 1"], id="chat-weight-2"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a", "weight": "1"}]}), [2],
                 ["line 2: messages[1].weight must be 0 or 1"], id="chat-weight-string"),
    pytest.param(jsonl(GOOD_CHAT, {"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a", "weight": 0.5}]}), [2],
                 ["line 2: messages[1].weight must be 0 or 1"], id="chat-weight-half"),
    # --- completion
    pytest.param(jsonl(GOOD_COMPLETION, {"prompt": "p"}), [2], ["line 2: 'completion' must be a non-empty string"],
                 id="completion-missing-completion"),
    pytest.param(jsonl(GOOD_COMPLETION, {"prompt": "p", "completion": " "}), [2],
                 ["line 2: 'completion' must be a non-empty string"], id="completion-blank-completion"),
    pytest.param(jsonl(GOOD_COMPLETION, {"completion": "c"}), [2], ["line 2: 'prompt' must be a string"],
                 id="completion-missing-prompt"),
    pytest.param(jsonl(GOOD_COMPLETION, {"prompt": 3, "completion": "c"}), [2],
                 ["line 2: 'prompt' must be a string"], id="completion-prompt-not-string"),
    pytest.param(jsonl(GOOD_COMPLETION, {**GOOD_COMPLETION, "text": "t"}), [2],
                 ["line 2: unknown field(s) ['text'] for the completion format"], id="completion-unknown-field"),
    # --- instruction
    pytest.param(jsonl(GOOD_INSTRUCTION, {"output": "o"}), [2], ["line 2: 'instruction' must be a non-empty string"],
                 id="instruction-missing-instruction"),
    pytest.param(jsonl(GOOD_INSTRUCTION, {"instruction": "", "output": "o"}), [2],
                 ["line 2: 'instruction' must be a non-empty string"], id="instruction-empty-instruction"),
    pytest.param(jsonl(GOOD_INSTRUCTION, {"instruction": "i"}), [2], ["line 2: 'output' must be a non-empty string"],
                 id="instruction-missing-output"),
    pytest.param(jsonl(GOOD_INSTRUCTION, {"instruction": "i", "output": ""}), [2],
                 ["line 2: 'output' must be a non-empty string"], id="instruction-empty-output"),
    pytest.param(jsonl(GOOD_INSTRUCTION, {"instruction": "i", "input": ["x"], "output": "o"}), [2],
                 ["line 2: 'input' must be a string when present"], id="instruction-input-not-string"),
    pytest.param(jsonl(GOOD_INSTRUCTION, {**GOOD_INSTRUCTION, "system": "s"}), [2],
                 ["line 2: unknown field(s) ['system'] for the instruction format"], id="instruction-unknown-field"),
    # --- text
    pytest.param(jsonl(GOOD_TEXT, {"text": ""}), [2], ["line 2: 'text' must be a non-empty string"],
                 id="text-empty"),
    pytest.param(jsonl(GOOD_TEXT, {"text": 12}), [2], ["line 2: 'text' must be a non-empty string"],
                 id="text-not-string"),
    pytest.param(jsonl(GOOD_TEXT, {"text": "t", "meta": 1}), [2],
                 ["line 2: unknown field(s) ['meta'] for the text format"], id="text-unknown-field"),
    # --- several problems are all reported, with their own line numbers
    pytest.param(jsonl(GOOD_TEXT, {"text": ""}, "", GOOD_TEXT, {"text": "t", "x": 1}), [2, 5],
                 ["line 2: 'text' must be", "line 5: unknown field(s) ['x']"], id="several-problems"),
]


@pytest.mark.parametrize(("raw", "lines", "expected"), BAD_FILES)
def test_parse_bad_files(raw: bytes, lines: list[int], expected: list[str]) -> None:
    with pytest.raises(DatasetError) as info:
        parse_jsonl(raw, max_examples=MAX_EXAMPLES)
    message = str(info.value)
    assert [n for n, _ in info.value.problems] == lines
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    # No other line is blamed.
    assert sorted({int(n) for n in re.findall(r"\bline (\d+):", message)}) == [n for n in lines if n]


def test_problem_list_is_capped_and_summarised() -> None:
    raw = jsonl(GOOD_TEXT, *(["not json"] * 25), GOOD_TEXT, "[1]")
    with pytest.raises(DatasetError) as info:
        parse_jsonl(raw, max_examples=100)
    # Every problem is kept on the exception; the message shows the first 20 and counts the rest.
    assert [n for n, _ in info.value.problems] == [*range(2, 27), 28]
    message = str(info.value)
    shown = [int(n) for n in re.findall(r"\bline (\d+):", message)]
    assert shown == list(range(2, 2 + MAX_REPORTED_PROBLEMS))
    assert message.endswith("; and 6 more problem(s)")


def test_exactly_twenty_problems_have_no_summary() -> None:
    with pytest.raises(DatasetError) as info:
        parse_jsonl(jsonl(*(["{"] * MAX_REPORTED_PROBLEMS)), max_examples=100)
    assert "more problem" not in str(info.value)
    assert len(re.findall(r"\bline \d+:", str(info.value))) == MAX_REPORTED_PROBLEMS


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_unicode_line_separators_inside_json_strings(separator: str) -> None:
    raw = (json.dumps({"text": f"one{separator}two"}, ensure_ascii=False) + "\n"
           + json.dumps(GOOD_TEXT) + "\n").encode()
    dataset = parse_jsonl(raw, max_examples=100)
    assert dataset.records[0]["text"] == f"one{separator}two"
    assert dataset.line_numbers == [1, 2]


# ------------------------------------------------------------------ encoding with the real SmolLM2 tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer: Any) -> Any:
    assert tiny_tokenizer.eos_token == EOS, "these tests assume SmolLM2's ChatML tokenizer"
    return tiny_tokenizer


def trained_runs(tokenizer: Any, example: EncodedExample) -> list[str]:
    """Each contiguous run of loss_mask=1 tokens, decoded."""
    runs: list[list[int]] = []
    previous = 0
    for token, bit in zip(example.input_ids, example.loss_mask, strict=True):
        if bit and not previous:
            runs.append([])
        if bit:
            runs[-1].append(token)
        previous = bit
    return [tokenizer.decode(run) for run in runs]


def split_text(tokenizer: Any, example: EncodedExample) -> tuple[str, str, str]:
    """(full text, trained text, untrained text) decoded from an encoded example."""
    assert len(example.input_ids) == len(example.loss_mask) > 0
    assert set(example.loss_mask) <= {0, 1}
    trained = [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m]
    untrained = [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if not m]
    return tokenizer.decode(example.input_ids), tokenizer.decode(trained), tokenizer.decode(untrained)


CHAT_CASES = [
    pytest.param(chat(("system", "You are SYSPROMPT."), ("user", "USERQ one?"), ("assistant", "ANSWER one.")),
                 ["ANSWER one."], id="with-system"),
    pytest.param(chat(("user", "USERQ one?"), ("assistant", "ANSWER one.")), ["ANSWER one."], id="default-system"),
    pytest.param(chat(("system", "SYSPROMPT"), ("user", "USERQ 1"), ("assistant", "ANSWER 1"),
                      ("user", "USERQ 2"), ("assistant", " ANSWER 2, with spaces "), ("user", "USERQ 3"),
                      ("assistant", "ANSWER\n3")),
                 ["ANSWER 1", " ANSWER 2, with spaces ", "ANSWER\n3"], id="multi-turn"),
    pytest.param({"messages": [{"role": "user", "content": "USERQ 1"},
                               {"role": "assistant", "content": "SKIPPED answer", "weight": 0},
                               {"role": "user", "content": "USERQ 2"},
                               {"role": "assistant", "content": "ANSWER 2", "weight": 1}]},
                 ["ANSWER 2"], id="weight-0-turn"),
    pytest.param({"messages": [{"role": "user", "content": "USERQ 1"},
                               {"role": "assistant", "content": "ANSWER 1"},
                               {"role": "user", "content": "USERQ 2"},
                               {"role": "assistant", "content": "SKIPPED answer", "weight": 0},
                               {"role": "user", "content": "USERQ 3"},
                               {"role": "assistant", "content": "ANSWER 3"}]},
                 ["ANSWER 1", "ANSWER 3"], id="weight-0-middle-turn"),
    pytest.param(chat(("user", "USERQ"), ("assistant", "ANSWER a"), ("assistant", "ANSWER b")),
                 ["ANSWER a", "ANSWER b"], id="consecutive-assistants"),
    pytest.param(chat(("system", "SYSPROMPT"), ("assistant", "ANSWER without a user turn")),
                 ["ANSWER without a user turn"], id="system-then-assistant"),
    pytest.param(chat(("user", "Quelle heure est-il ? \u2603"), ("assistant", "Il est midi \U0001f600 \u00e9t\u00e9")),
                 ["Il est midi \U0001f600 \u00e9t\u00e9"], id="non-ascii"),
]


def _assistant_turn(content: str) -> str:
    return content + EOS + "\n"


@pytest.mark.parametrize(("record", "trained_answers"), CHAT_CASES)
def test_encode_chat(tokenizer: Any, record: dict[str, Any], trained_answers: list[str]) -> None:
    messages = record["messages"]
    example = encode_example(tokenizer, record, "chat")
    full, trained, untrained = split_text(tokenizer, example)

    # The whole sequence is exactly what the chat template renders (and tokenises the same way as a whole).
    rendered = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                             tokenize=False)
    assert full == rendered
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]

    # Trained tokens: every weighted assistant turn, each its own run, content + <|im_end|> (+ the newline).
    assert trained_runs(tokenizer, example) == [_assistant_turn(a) for a in trained_answers]
    assert trained == "".join(_assistant_turn(a) for a in trained_answers)

    # System and user text (and weight-0 answers) are only ever in the untrained part.
    for message in messages:
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            assert message["content"] not in trained
            assert message["content"] in untrained
    assert "<|im_start|>" not in trained
    assert untrained.count("<|im_start|>assistant\n") == sum(m["role"] == "assistant" for m in messages)


def test_encode_chat_with_tools_trains_the_call_not_the_result(tokenizer: Any) -> None:
    """A line in OpenAI's function-calling format: the call is trained in the convention serving reads back
    (adapters/tool_calls.py), the tools and the tool's result are context."""
    assert check_record(TOOL_CHAT, "chat") is None
    example = encode_example(tokenizer, TOOL_CHAT, "chat")
    full, trained, untrained = split_text(tokenizer, example)
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert trained_runs(tokenizer, example) == [_assistant_turn(call), _assistant_turn("ANSWER noon.")]
    assert "TOOLRESULT 12:00" in untrained and "<tool_response>" in untrained and '"name": "get_time"' in untrained
    assert "TOOLRESULT" not in trained


def test_encode_completion(tokenizer: Any) -> None:
    record = {"prompt": "Translate to French: cat =>", "completion": " chat"}
    example = encode_example(tokenizer, record, "completion")
    full, trained, untrained = split_text(tokenizer, example)
    assert trained == " chat" + EOS
    assert untrained == "Translate to French: cat =>"
    assert full == "Translate to French: cat => chat" + EOS
    # The prompt comes first, then only trained tokens.
    first = example.loss_mask.index(1)
    assert example.loss_mask == [0] * first + [1] * (len(example.loss_mask) - first)


def test_encode_completion_with_empty_prompt_trains_everything(tokenizer: Any) -> None:
    example = encode_example(tokenizer, {"prompt": "", "completion": "All of it"}, "completion")
    assert set(example.loss_mask) == {1}
    assert tokenizer.decode(example.input_ids) == "All of it" + EOS


@pytest.mark.parametrize(("record", "user_content"), [
    pytest.param({"instruction": "Translate to French", "input": "the cat", "output": "le chat"},
                 "Translate to French\n\nthe cat", id="with-input"),
    pytest.param({"instruction": "Name a colour", "output": "blue"}, "Name a colour", id="without-input"),
    pytest.param({"instruction": "Name a colour", "input": "", "output": "blue"}, "Name a colour", id="empty-input"),
])
def test_encode_instruction(tokenizer: Any, record: dict[str, Any], user_content: str) -> None:
    example = encode_example(tokenizer, record, "instruction")
    full, trained, untrained = split_text(tokenizer, example)
    messages = [{"role": "user", "content": user_content}, {"role": "assistant", "content": record["output"]}]
    assert full == tokenizer.apply_chat_template(messages, tokenize=False)
    assert trained == _assistant_turn(record["output"])
    assert user_content in untrained
    assert record["instruction"] not in trained
    if record.get("input"):
        assert record["input"] not in trained


def test_encode_text_trains_everything(tokenizer: Any) -> None:
    example = encode_example(tokenizer, {"text": "The quick brown fox."}, "text")
    assert set(example.loss_mask) == {1}
    assert tokenizer.decode(example.input_ids) == "The quick brown fox." + EOS


def test_encode_dataset_and_check_lengths_use_file_line_numbers(tokenizer: Any) -> None:
    short, long = {"text": "hi"}, {"text": " ".join(["word"] * 40)}
    dataset = parse_jsonl(jsonl("", short, long, "", "", long, short, "  ", long), max_examples=100)
    assert dataset.line_numbers == [2, 3, 6, 7, 9]
    examples = encode_dataset(tokenizer, dataset)
    assert [len(e.input_ids) for e in examples] == [
        len(encode_example(tokenizer, r, "text").input_ids) for r in dataset.records]
    long_len = len(examples[1].input_ids)
    limit = len(examples[0].input_ids) + 1
    assert long_len > limit

    problems = check_lengths(examples, dataset.line_numbers, max_tokens=limit)
    assert [n for n, _ in problems] == [3, 6, 9]
    assert all(msg == f"{long_len} tokens; the limit is {limit} per example" for _, msg in problems)
    # At exactly the limit an example is accepted.
    assert check_lengths(examples, dataset.line_numbers, max_tokens=long_len) == []


def test_check_lengths_requires_matching_line_numbers() -> None:
    with pytest.raises(ValueError):
        check_lengths([EncodedExample([1], [1])], [1, 2], max_tokens=10)


def test_chat_starting_with_assistant_is_rejected_at_validation() -> None:
    raw = jsonl(chat(("user", "q"), ("assistant", "a")), chat(("assistant", "Hello, how can I help?")))
    with pytest.raises(DatasetError, match=r"line 2: messages\[0\]: an assistant message needs a user message"):
        parse_jsonl(raw, max_examples=100)


@pytest.mark.parametrize("weight", [True, False])
def test_boolean_weights_are_refused(weight: bool) -> None:
    raw = json.dumps({"messages": [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "a", "weight": weight}]}).encode()
    with pytest.raises(DatasetError, match="weight must be 0 or 1"):
        parse_jsonl(raw, max_examples=100)


def test_one_upload_reports_broken_json_and_bad_examples_together_in_line_order() -> None:
    no_answer = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    raw = jsonl(no_answer, GOOD_CHAT, "{not json", no_answer)
    with pytest.raises(DatasetError) as info:
        parse_jsonl(raw, max_examples=100)
    assert [n for n, _ in info.value.problems] == [1, 3, 4]
    assert "not valid JSON" in info.value.problems[1][1]


def test_length_stats_summarise_and_bin_every_example() -> None:
    examples = [EncodedExample(input_ids=[0] * n, loss_mask=[0] * (n - 2) + [1, 1]) for n in (3, 10, 10, 40, 120)]
    stats = length_stats(examples, bins=4)
    assert (stats["min_tokens"], stats["max_tokens"], stats["p50_tokens"], stats["p95_tokens"]) == (3, 120, 10, 120)
    assert stats["mean_tokens"] == 36.6 and stats["trained_tokens"] == 10
    assert stats["length_histogram"] == {"bin_edges": [0, 30, 60, 90, 120], "counts": [3, 1, 0, 1]}
    assert length_stats([]) == {}
