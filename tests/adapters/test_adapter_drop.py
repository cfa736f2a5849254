"""A deleted adapter in the engine (AdapterCache.drop): dropped at once when no request uses it; a request already
running on it finishes on it, and the adapter leaves at the engine's next activation after that."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from adapters.engine import AdapterRef, SamplingParams
from tests.adapters.test_engine import PROMPT, make_runtime, scheduler_paused, trained  # noqa: F401 (a fixture)
from tests.budgets import UNLESS_BROKEN


def test_a_deleted_adapter_leaves_once_its_requests_end(trained: dict[str, Path],  # noqa: F811
                                                        tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    runtime = make_runtime(tiny_model_dir, tiny_tokenizer, slots=2)
    try:
        ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        idle = runtime.adapters.load(AdapterRef(key="idle", folder=trained["ia3"], base_model="tiny"))
        runtime.generate(ids, idle, SamplingParams(max_tokens=1, temperature=0))
        runtime.adapters.pin("idle", True)
        assert runtime.call(lambda: runtime.adapters.drop("idle")) is True  # pinned, but deleted: gone at once
        assert runtime.adapters.residency("idle") is None

        busy = runtime.adapters.load(AdapterRef(key="busy", folder=trained["lora"], base_model="tiny"))
        expected = runtime.generate(ids, busy, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        with scheduler_paused(runtime):
            running = runtime.submit(ids, busy, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        deadline = time.monotonic() + UNLESS_BROKEN
        while not running.produced:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert runtime.call(lambda: runtime.adapters.drop("busy")) is False  # a row still decodes with it
        assert running.wait().token_ids == expected.token_ids  # finished on it, unchanged
        assert runtime.adapters.residency("busy") is not None
        other = runtime.adapters.load(AdapterRef(key="other", folder=trained["ia3"], base_model="tiny"))
        runtime.generate(ids, other, SamplingParams(max_tokens=1, temperature=0))  # the next activation sweeps
        assert runtime.adapters.residency("busy") is None and "busy" not in runtime.adapters.in_memory_keys()
    finally:
        runtime.close()
