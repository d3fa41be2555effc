"""Every ``from project.module import name`` in the packages, benches and tests resolves, function-level ones too.

A lazy import runs only on its own path (an error branch, a rare mode), so a name that moved away breaks it
silently until a user takes that path; this test imports each module named and looks each name up.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "service", "verifier")
SCANNED = (*PACKAGES, "bench", "tests")  # whose imports of the packages are checked


def _imports() -> list[tuple[str, int, str, str]]:
    found = []
    for folder in SCANNED:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.split(".")[0] in PACKAGES:
                    found.extend((path.relative_to(REPO_ROOT).as_posix(), node.lineno, node.module, alias.name)
                                 for alias in node.names)
    return found


def test_every_project_import_names_something_that_exists() -> None:
    missing = []
    for where, line, module_name, name in _imports():
        module = importlib.import_module(module_name)
        if name != "*" and not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")  # a submodule
            except ModuleNotFoundError:
                missing.append(f"{where}:{line}: from {module_name} import {name}")
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)

