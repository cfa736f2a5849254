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


def assert_same_weights(got: dict[str, Any], expected: dict[str, Any], *, learning_rate: float) -> None:
    """The same adapter, up to float summation order. Gradients summed in another order agree to about 1e-6,
    but Adam's steps are ±lr-sized whatever a gradient's size, so a near-zero gradient whose last bits differ
    can move a weight apart by a small fraction of one step; a wrongly scaled or split loss moves weights by
    a good share of every step. So: no weight further apart than 5 % of one step's largest move."""
    assert got.keys() == expected.keys() and got
    for name, weight in expected.items():
        drift = float((got[name] - weight).abs().max())
        assert drift <= 0.05 * learning_rate, (name, drift, learning_rate)
