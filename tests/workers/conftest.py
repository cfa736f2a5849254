"""Fixtures shared by the training-path tests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.data import EncodedExample, encode_dataset, parse_jsonl
from tests.conftest import chat_lines


@pytest.fixture(scope="module")
def examples(tiny_tokenizer: Any) -> list[EncodedExample]:
    """Examples of very different lengths, several labelled tokens each."""
    spread = "\n".join(json.dumps({"messages": [{"role": "user", "content": "word " * (7 * i)},
                                                {"role": "assistant", "content": "answer " * i}]})
                       for i in range(1, 6))
    return encode_dataset(tiny_tokenizer, parse_jsonl((chat_lines(3) + spread + "\n").encode(), max_examples=100))
