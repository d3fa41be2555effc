"""Counted code bytes: the source that the 16,000,000-byte cap charges alongside the artifact.

Upstream counts the UTF-8 length of its single ``train_gpt.py``, which holds everything needed to rebuild the
model and score it. This project splits that script into modules, so it counts the source needed to **rebuild a
model from an artifact and produce its score**:

- the roots: ``trainer/artifact.py`` (reader; it pulls in ``trainer/model.py`` and ``trainer/quant.py``),
  ``trainer/data/byte_accounting.py`` (bytes per token, the bpb denominator) and every ``*.py`` under
  ``service/engine/`` (the evaluation loops);
- plus every project module those files import, transitively (including function-level imports, excluding
  ``if TYPE_CHECKING:`` blocks), and the ``__init__.py`` of every package on the way, because importing a module
  runs them.

Following the imports rather than listing files keeps the count honest as the engine grows: when the engine
starts to read validation shards through ``trainer/data/loader.py``, that file is counted. Training-only code
(Muon, the training loop, corpus building) is not reached and not counted. docs/artifact-format.md has the
definition for submitters.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOT_FILES = ("trainer/artifact.py", "trainer/data/byte_accounting.py")
ENGINE_DIR = "service/engine"
PROJECT_PACKAGES = ("trainer", "service")  # imports of these are followed; everything else is a dependency


@dataclass(frozen=True)
class CodeBytes:
    total: int
    files: dict[str, int]  # repo-relative POSIX path -> size in bytes, sorted by path


def counted_code_bytes(root: Path | str | None = None) -> CodeBytes:
    """Sum the byte sizes of the counted files under ``root`` (default: this checkout).

    The root files must exist (a missing one would silently undercount) and so must every project module they
    import; the engine files are whatever ``*.py`` exist under service/engine/ at call time. Every counted file
    must be valid UTF-8.
    """
    base = Path(root) if root is not None else REPO_ROOT
    missing = [rel for rel in ROOT_FILES if not (base / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"counted code files missing under {base}: {', '.join(missing)}")
    engine = sorted(p for p in (base / ENGINE_DIR).rglob("*.py") if p.is_file())
    pending = [base / rel for rel in ROOT_FILES] + engine
    counted: dict[str, int] = {}
    while pending:
        path = pending.pop()
        rel = path.relative_to(base).as_posix()
        if rel in counted:
            continue
        source = path.read_bytes()
        text = source.decode("utf-8")  # counted code is UTF-8 source; anything else is an error, not a count
        counted[rel] = len(source)
        for module, required in _imported_modules(text, rel):
            pending += _module_files(base, module, required=required, importer=rel)
    files = dict(sorted(counted.items()))
    return CodeBytes(total=sum(files.values()), files=files)


def _imported_modules(source: str, rel: str) -> set[tuple[str, bool]]:
    """(dotted module name, must exist) for every project import anywhere in a file.

    ``from pkg import name`` yields ``pkg`` (must exist) and ``pkg.name`` (counted only if it is a module file:
    the name may be an attribute instead).
    """
    tree = ast.parse(source, filename=rel)
    package = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    if not rel.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    modules: set[tuple[str, bool]] = set()
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            modules.update((alias.name, True) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: climb from the importing file's package
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base_module = ".".join(parts + ([node.module] if node.module else []))
            else:
                base_module = node.module or ""
            modules.add((base_module, True))
            modules.update((f"{base_module}.{alias.name}", False) for alias in node.names if alias.name != "*")
    return {(m, required) for m, required in modules if m.split(".")[0] in PROJECT_PACKAGES}


def _walk_runtime(tree: ast.AST):
    """ast.walk, minus the bodies of ``if TYPE_CHECKING:`` (those imports never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_files(base: Path, module: str, *, required: bool, importer: str) -> list[Path]:
    """The file of ``module`` plus the __init__.py of each enclosing package; [] for an optional name that is
    not a module. A required module that is not in the tree is an error (it would go uncounted)."""
    parts = module.split(".")
    as_file = base.joinpath(*parts).with_suffix(".py")
    as_package = base.joinpath(*parts, "__init__.py")
    if as_file.is_file():
        own = as_file
    elif as_package.is_file():
        own = as_package
    elif required:
        raise FileNotFoundError(f"{importer} imports {module}, which is not a module under {base}")
    else:
        return []
    parents = [base.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts))]
    return [f for f in parents if f.is_file()] + [own]
