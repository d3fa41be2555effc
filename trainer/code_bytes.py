"""Counted code bytes: the source that the 16,000,000-byte cap charges alongside the artifact.

Upstream counts the UTF-8 length of its single ``train_gpt.py``, which holds everything needed to rebuild the
model and score it. This project splits that script into modules, so it counts **exactly the modules a compliant
evaluation imports**, found by following the real import graph:

- the entry point: ``service/engine/run.py`` (``evaluate`` reads the artifact and the validation shards and runs
  the scoring loop);
- plus every project module it imports, transitively (including function-level imports, excluding
  ``if TYPE_CHECKING:`` blocks), and the ``__init__.py`` of every package on the way, because importing a module
  runs them;
- minus the modules in ``NOT_COUNTED``: code that a compliant evaluation of a .pgolf artifact never loads (a
  non-compliant mode, the .ptz path, training-only initialisation). Each must be imported lazily (inside a
  function), never at module level, so a compliant evaluation provably runs without it. Its failure paths are
  part of it and counted: the copy of the counted files must refuse bad inputs with the same error events.

Following the imports rather than listing files keeps the count honest as the engine grows: a module the
evaluation starts to import is counted the moment it is imported. What an evaluation does not import is not
counted: training (loop, Muon, data download, corpus building), the artifact *writer*, the command-line front ends
that turn flags into ``EvalOptions`` (``python -m service evaluate``), the HTTP service and the verifier.
tests/test_code_bytes.py proves sufficiency: it copies only the counted files into an empty directory and
evaluates an artifact from there, bit-identical to the normal run. docs/artifact-format.md §7 has the definition
for submitters; ``python -m trainer.code_bytes`` prints the per-file breakdown.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("service/engine/run.py",)
PROJECT_PACKAGES = ("trainer", "service")  # imports of these are followed; everything else is a dependency
# Module -> why a compliant evaluation of a .pgolf artifact never loads it.
NOT_COUNTED: dict[str, str] = {
    "service.engine.ngram_hashed": "the hashed-940 reproduction: scores only the realised token, so it is "
                                   "non-compliant by construction and only `--ngram hashed-940` loads it",
    # Upstream .ptz artifacts are scored with the upstream submission's own train_gpt.py counted; pgolf's reader
    # for them is never loaded by the evaluation of a .pgolf submission.
    "trainer.upstream_artifact": "the reader of upstream .ptz artifacts; only a .ptz evaluation loads it",
    "trainer.upstream_config": "reads an upstream train_gpt.py's config; only a .ptz evaluation loads it",
    "trainer.init": "the reference initialisation: the evaluation builds the model on the meta device and assigns "
                    "the artifact's weights, so only training (off the meta device) loads it",
    "service.engine.upstream_inputs": "loads a .ptz submission for the engine; only a .ptz evaluation loads it",
}


@dataclass(frozen=True)
class CodeBytes:
    total: int
    files: dict[str, int]  # repo-relative POSIX path -> size in bytes, sorted by path


@dataclass(frozen=True)
class _Import:
    module: str  # dotted name
    required: bool  # False for ``from pkg import name``'s ``pkg.name``, which may be an attribute, not a module
    top_level: bool  # executed when the importing module is imported (not inside a function)


def counted_code_bytes(root: Path | str | None = None) -> CodeBytes:
    """Sum the byte sizes of the counted files under ``root`` (default: this checkout).

    The entry points must exist (a missing one would silently undercount) and so must every project module they
    import. A ``NOT_COUNTED`` module imported at module level is an error: the evaluation could not run without
    it. Every counted file must be valid UTF-8.
    """
    base = Path(root) if root is not None else REPO_ROOT
    missing = [rel for rel in ENTRY_POINTS if not (base / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"counted code files missing under {base}: {', '.join(missing)}")
    pending = [path for rel in ENTRY_POINTS for path in _module_files(base, _module_name(rel), importer=rel)]
    counted: dict[str, int] = {}
    while pending:
        path = pending.pop()
        rel = path.relative_to(base).as_posix()
        if rel in counted:
            continue
        source = path.read_bytes()
        text = source.decode("utf-8")  # counted code is UTF-8 source; anything else is an error, not a count
        counted[rel] = len(source)
        for imported in _project_imports(text, rel):
            excluded = _not_counted(imported.module)
            if excluded is None:
                pending += _module_files(base, imported.module, required=imported.required, importer=rel)
            elif imported.top_level:
                raise ValueError(f"{rel} imports {excluded} at module level, so every evaluation loads it; "
                                 f"it is listed as not counted ({NOT_COUNTED[excluded]}): import it lazily")
    files = dict(sorted(counted.items()))
    return CodeBytes(total=sum(files.values()), files=files)


def _module_name(rel: str) -> str:
    return rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")


def _not_counted(module: str) -> str | None:
    """The NOT_COUNTED entry that ``module`` is, or lies inside."""
    return next((name for name in NOT_COUNTED if module == name or module.startswith(name + ".")), None)


def _project_imports(source: str, rel: str) -> set[_Import]:
    """Every project import anywhere in a file.

    ``from pkg import name`` yields ``pkg`` (must exist) and ``pkg.name`` (counted only if it is a module file:
    the name may be an attribute instead).
    """
    tree = ast.parse(source, filename=rel)
    package = _module_name(rel)
    if not rel.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    found: set[_Import] = set()
    for node, top_level in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            found.update(_Import(alias.name, True, top_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: climb from the importing file's package
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base_module = ".".join(parts + ([node.module] if node.module else []))
            else:
                base_module = node.module or ""
            found.add(_Import(base_module, True, top_level))
            found.update(_Import(f"{base_module}.{alias.name}", False, top_level)
                         for alias in node.names if alias.name != "*")
    return {i for i in found if i.module.split(".")[0] in PROJECT_PACKAGES}


def _walk_runtime(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """(node, runs at import time) for every node, minus the bodies of ``if TYPE_CHECKING:`` (never run)."""
    stack: list[tuple[ast.AST, bool]] = [(tree, True)]
    while stack:
        node, top_level = stack.pop()
        yield node, top_level
        inner = top_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend((c, inner) for c in child.orelse)
                continue
            stack.append((child, inner))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_files(base: Path, module: str, *, required: bool = True, importer: str) -> list[Path]:
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


def main() -> int:
    code = counted_code_bytes()
    for rel, size in sorted(code.files.items(), key=lambda item: -item[1]):
        print(f"{size:>8,}  {rel}")
    print(f"{code.total:>8,}  total ({len(code.files)} files)")
    for module, reason in NOT_COUNTED.items():
        print(f"not counted: {module} ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
