"""The reference pages (docs/reference/) are what the code renders now, every setting and hyperparameter has a
description to render, and `adaptery reference --check` fails on a stale page. Pure Python: no servers, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters import base_models
from adapters.methods import METHODS
from app import reference
from app.cli import cli
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "reference"
REGENERATE = "run `adaptery reference` (or `.venv/bin/python -m app.cli reference`) and commit docs/reference/"


def test_committed_pages_are_what_the_code_renders() -> None:
    assert reference.DEFAULT_FOLDER == COMMITTED
    stale = reference.stale(COMMITTED)
    assert not stale, f"docs/reference/{', docs/reference/'.join(stale)} differ from the code: {REGENERATE}"


def test_pages_do_not_depend_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # An operator's limits and paths in this process's environment must not reach the committed pages.
    monkeypatch.setenv("ADAPTERY_MAX_LORA_RANK", "4")
    monkeypatch.setenv("ADAPTERY_MAX_SEQ_LENGTH_LIMIT", "128")
    monkeypatch.setenv("ADAPTERY_DATA_DIR", "/somewhere/else")
    assert Settings().max_lora_rank == 4  # the environment is read by Settings()...
    assert reference.render() == {name: (COMMITTED / name).read_text(encoding="utf-8")
                                  for name in reference.PAGES}  # ...and not by the pages


def test_every_setting_has_a_description() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"Settings fields without a description (Field(description=...)): {missing}"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_hyperparameter_has_a_description(name: str) -> None:
    fields = METHODS[name].hyperparameters.model_fields
    missing = [field for field, info in fields.items() if not (info.description or "").strip()]
    assert not missing, f"{name} hyperparameters without a description: {missing}"


def test_every_setting_and_hyperparameter_is_on_a_page() -> None:
    pages = reference.render()
    for name in Settings.model_fields:
        assert f"`{reference.env_var(name)}`" in pages["configuration.md"], name
    for method in METHODS.values():
        assert f"## {reference.method_heading(method)}\n" in pages["hyperparameters.md"], method.name
        for field in method.hyperparameters.model_fields:
            assert f"| `{field}` |" in pages["hyperparameters.md"], (method.name, field)


def test_the_llama_shape_is_the_core_one() -> None:
    # The shape the defaults are computed for is the one base_info() assumes for a model it cannot read.
    assert reference.LLAMA_LINEAR_MODULES == base_models.LLAMA_TARGET_MODULES
    assert base_models.base_info(str(ROOT / "no-such-model")) == reference.LLAMA_BASE_INFO


def test_check_fails_on_a_stale_page_and_writing_fixes_it(tmp_path: Path) -> None:
    runner = CliRunner()
    written = runner.invoke(cli, ["reference", "--folder", str(tmp_path)])
    assert written.exit_code == 0, written.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(reference.PAGES)
    assert runner.invoke(cli, ["reference", "--check", "--folder", str(tmp_path)]).exit_code == 0

    page = tmp_path / "hyperparameters.md"
    page.write_text(page.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    (tmp_path / "configuration.md").unlink()
    checked = runner.invoke(cli, ["reference", "--check", "--folder", str(tmp_path)])
    assert checked.exit_code == 1
    assert "hyperparameters.md" in checked.output and "configuration.md" in checked.output
    assert "edited by hand" in page.read_text(encoding="utf-8")  # --check writes nothing
    assert not (tmp_path / "configuration.md").exists()

    assert runner.invoke(cli, ["reference", "--folder", str(tmp_path)]).exit_code == 0
    assert runner.invoke(cli, ["reference", "--check", "--folder", str(tmp_path)]).exit_code == 0


def test_the_generator_does_not_import_torch() -> None:
    # The API process never imports torch; neither may rendering the pages (it reads adapters.methods).
    code = "import sys; from app import reference; reference.render(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
