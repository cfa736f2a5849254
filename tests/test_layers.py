"""The code's one direction of imports, and one place for method names, checked by reading the source.

core (adapters/) ← app/ (settings, database, services, the queue) ← entry points (app/api, workers/, bench/).
A method's name and PEFT type appear only in its module under adapters/methods/; everything else asks
the registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from adapters.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = ("adapters", "app", "workers")


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "migrations" not in p.parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in sources(package)
            for line, module in imported_modules(path) if module.split(".")[0] in forbidden]


@pytest.mark.parametrize(("package", "forbidden"), [("adapters", ("app", "workers")), ("app", ("workers",))])
def test_imports_run_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    assert violations(package, forbidden) == []


def test_the_checks_see_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from workers.tasks import train\n    import app.queue\n")
    assert [m for _, m in imported_modules(sample)] == ["workers.tasks", "app.queue"]


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
