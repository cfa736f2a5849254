"""The task files bench.quality measures on are what examples/make_tasks.py writes, every line is one the upload
accepts, and no held-out line is a training line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from adapters.data import parse_jsonl

pytestmark = pytest.mark.fast

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TASKS = {"translation": "chat", "summaries": "chat", "questions": "chat", "uppercase_preference": "preference"}


def test_the_shipped_files_are_what_the_script_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("make_tasks", EXAMPLES / "make_tasks.py")
    assert spec is not None and spec.loader is not None
    make_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tasks)
    monkeypatch.setattr(make_tasks, "HERE", tmp_path)
    make_tasks.main()
    for task in TASKS:
        for part in ("train", "heldout"):
            name = f"{task}_{part}.jsonl"
            assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), name


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_line_is_accepted_and_held_out_lines_are_new(task: str) -> None:
    train = (EXAMPLES / f"{task}_train.jsonl").read_bytes()
    heldout = (EXAMPLES / f"{task}_heldout.jsonl").read_bytes()
    for content in (train, heldout):
        dataset = parse_jsonl(content, max_examples=10_000)  # raises DatasetError naming any bad line
        assert dataset.format == TASKS[task] and len(dataset.records) >= 20
    assert not set(heldout.splitlines()) & set(train.splitlines())
    assert len(train.splitlines()) <= 300  # small files: "a few hundred lines at most"
