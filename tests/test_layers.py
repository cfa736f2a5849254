"""The code's one direction of imports (an import-linter contract), and one place for method names (read from the
source).

core (adapters/) ← app/ (settings, database, services, the queue) ← entry points (app/api, workers/, bench/).
A method's name and PEFT type appear only in its module under adapters/methods/; everything else asks
the registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

from adapters.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = ("adapters", "app", "workers")


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "migrations" not in p.parts)


def test_imports_run_one_way() -> None:
    """The layers contract in pyproject.toml ([tool.importlinter]), checked on the whole import graph: a direct
    import against the direction, one inside a function, or an indirect chain through a third module all break it."""
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


def method_words() -> set[str]:
    words = set()
    for method in METHODS.values():
        words |= {method.name, method.peft_type, *method.aliases}
    return words


def test_method_names_and_peft_types_live_only_in_their_modules() -> None:
    words = method_words()
    found = []
    for package in APPLICATION:
        for path in sources(package):
            if path.is_relative_to(ROOT / "adapters" / "methods"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == [], "branch on the registry (adapters.methods), not on a method's name or PEFT type"
