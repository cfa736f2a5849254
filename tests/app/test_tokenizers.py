"""The API's tokenizer warm-up: loaded once, off the request path; an early request waits for that load."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from app.services import base_models, tokenizers
from app.settings import Settings
from tests.tiny_model import TINY_MODEL_ID


@pytest.fixture()
def fresh(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> tuple[Settings, list[str]]:
    """A process state with nothing loaded yet, and a record of every real tokenizer load."""
    monkeypatch.setattr(tokenizers, "_tokenizers", {})
    monkeypatch.setattr(tokenizers, "warm_up", tokenizers.WarmUp())
    loads: list[str] = []
    real_load = base_models.load_tokenizer

    def counted(settings: Settings, spec: Any) -> Any:
        loads.append(spec.id)
        return real_load(settings, spec)

    monkeypatch.setattr(base_models, "load_tokenizer", counted)
    monkeypatch.setenv("ADAPTERY_DEFAULT_BASE_MODEL", TINY_MODEL_ID)
    monkeypatch.setenv("ADAPTERY_BASE_MODELS", json.dumps({TINY_MODEL_ID: str(tiny_model_dir),
                                                           "missing": "/nonexistent/model-folder"}))
    return Settings(), loads


def test_a_request_during_the_warm_up_waits_for_it_instead_of_loading_again(fresh: tuple[Settings, list[str]]
                                                                          ) -> None:
    settings, loads = fresh
    thread = tokenizers.start_warm_up(settings)
    seen: list[Any] = []
    early = threading.Thread(target=lambda: seen.append(tokenizers.default(settings)))  # an upload's call
    early.start()
    early.join(timeout=120)
    thread.join(timeout=120)
    assert loads.count(TINY_MODEL_ID) == 1
    assert seen[0] is tokenizers.default(settings) and seen[0].pad_token is not None
    report = tokenizers.warm_up.report()
    assert report["ok"] and report["seconds"] > 0
    # Another configured model that cannot load is reported, not fatal (uploads do not need it).
    assert "missing" in tokenizers.warm_up.skipped


def test_ready_reports_warming_up_until_done(fresh: tuple[Settings, list[str]]) -> None:
    settings, _ = fresh
    assert tokenizers.warm_up.report() == {"ok": False, "state": "warming_up"}
    tokenizers.start_warm_up(settings).join(timeout=120)
    assert tokenizers.warm_up.report()["ok"]


def test_a_default_model_that_cannot_load_makes_the_warm_up_fail_loudly(monkeypatch: pytest.MonkeyPatch,
                                                                        fresh: tuple[Settings, list[str]]) -> None:
    monkeypatch.setenv("ADAPTERY_BASE_MODELS", json.dumps({TINY_MODEL_ID: "/nonexistent/folder"}))
    tokenizers.start_warm_up(Settings()).join(timeout=120)
    report = tokenizers.warm_up.report()
    assert not report["ok"] and "nonexistent" in report["error"]
