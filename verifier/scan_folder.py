"""Scanning a whole record folder: which Python files run, what the run command set, what cannot be analysed.

An upstream record is a folder, and ``train_gpt.py`` is not always the code that runs: it may ``exec`` a sibling
(``exec(open(__file__.replace("train_gpt.py", "train_gpt_decode.py")).read())``), import one (``from train_gdn_7k
import main``) or read one. Starting from the entry point, every Python file of the same folder that a scanned file
execs, imports or names is scanned too, transitively, and the report says how each was reached. Python files that
nothing reaches are listed, not scanned (data preparation scripts, a human-readable copy of a wrapped script).

Two things are reported as *not analysed* (a medium finding naming them), never silently passed:

* source in another language: ``.c`` / ``.cpp`` / ``.cu`` files in the folder, and C / C++ / CUDA source held in a
  string of a scanned file (compiled at run time with gcc / ``load_inline``);
* nothing else is guessed: data passed only on the command line is covered by reading the run command.

The run command: records document how they were run (``NGRAM_ENABLED=1 torchrun ... train_gpt.py`` in the README
or a launch script). The environment assignments of those commands are the configuration of the reported run, so
they override the script's defaults when deciding which branches run. When two commands disagree on a name, the
script's default stays.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from verifier.scan_findings import Finding

ENTRY_POINT = "train_gpt.py"
FOREIGN_SOURCE = (".c", ".cc", ".cpp", ".cxx", ".cu", ".cuh", ".h", ".hpp")
# Record folders are small; a bound keeps a hostile folder from making the scanner walk a large tree.
MAX_FOLDER_FILES = 2000
MAX_RUN_COMMAND_BYTES = 1_000_000
MAX_LOG_FILE_BYTES = 4_000_000
# All of a folder's logs together (each one is cut at MAX_LOG_FILE_BYTES): a few runs' stdout is well under it.
# A bound on reading, not the submission cap: changing the cap must not change how much log the scanner reads.
MAX_LOG_BYTES = 16 << 20

_ENV_ASSIGNMENT = re.compile(r"(?:^|\s)(?:export\s+)?([A-Z][A-Z0-9_]*)=(\"[^\"]*\"|'[^']*'|[^\s\"';|&]+)")
_ONLY_ASSIGNMENTS = re.compile(r"(?:export\s+)?(?:[A-Z][A-Z0-9_]*=(?:\"[^\"]*\"|'[^']*'|[^\s\"';|&]+)\s*)+")
_DATA_FILE = re.compile(r"\.(xz|lzma|gz|zst|bz2|npy|npz|pt|pth|ptz|pkl|pickle|bin|safetensors|h5)$", re.IGNORECASE)
_SHELL_DEFAULT = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?[-=]([^}]*)\}")
_LAUNCH = re.compile(r"\b(torchrun|python3?|accelerate\s+launch|deepspeed)\b[^\n]*\.py\b")
_FOREIGN_TEXT = re.compile(
    r"#\s*include\s*[<\"]|__global__\s+void|extern\s+\"C\"|\bint\s+main\s*\(|\bstatic\s+inline\s+\w+|"
    r"#\s*pragma\s+omp"
)


@dataclass(frozen=True)
class Reached:
    """A Python file of the folder to scan, and how the scan got there."""

    path: Path
    via: str  # "entry point" or "exec'd by train_gpt.py line 1", "imported by ...", "read by ..."


@dataclass
class FolderPlan:
    entry: Path | None
    files: list[Reached] = field(default_factory=list)
    unreached: list[Path] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)
    run_env: dict[str, str] = field(default_factory=dict)
    run_env_sources: list[str] = field(default_factory=list)
    error: str | None = None


def folder_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if len(found) >= MAX_FOLDER_FILES:
            break
        if path.is_file() and not path.is_symlink() and not any(part.startswith(".") for part in
                                                                    path.relative_to(folder).parts):
            found.append(path)
    return found


def entry_point(folder: Path, python_files: list[Path]) -> Path | None:
    top_level = [path for path in python_files if path.parent == folder]
    for path in top_level:
        if path.name == ENTRY_POINT:
            return path
    return top_level[0] if len(top_level) == 1 else None


# ----------------------------------------------------------------------------------------------------------------
# Run command
# ----------------------------------------------------------------------------------------------------------------


def _logical_lines(text: str) -> list[str]:
    """Lines with shell continuations (a trailing backslash) joined."""
    return text.replace("\\\r\n", " ").replace("\\\n", " ").splitlines()


def _shell_value(text: str) -> str | None:
    """The value a shell assigns: ``${NAME:-default}`` gives its default; other expansions are unknown."""
    match = _SHELL_DEFAULT.fullmatch(text)
    if match is not None:
        text = match.group(1)
    return None if "$" in text or "`" in text else text


def run_command_env(files: list[Path]) -> tuple[dict[str, str], list[str]]:
    """Environment assignments of the record's documented launch commands (README / *.sh / *.md).

    Only assignments on a line that launches a Python script, ``export`` lines of a launch script, and lines of
    a README code block that hold nothing but assignments count: a README's prose and tables are not configuration.
    """
    values: dict[str, set[str]] = {}
    sources: list[str] = []
    for path in files:
        if path.suffix.lower() not in {".md", ".sh", ".txt"} or path.stat().st_size > MAX_RUN_COMMAND_BYTES:
            continue
        if path.suffix.lower() == ".txt" and not path.name.lower().startswith(("run", "command", "launch")):
            continue  # .txt files of a record are its logs
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        is_script = path.suffix.lower() == ".sh"
        used = False
        in_code_block = False
        for line in _logical_lines(text):
            launch = _LAUNCH.search(line)
            stripped = line.strip()
            if stripped.startswith("```"):
                in_code_block = not in_code_block
                continue
            if launch is not None:
                scope = line[:launch.start()]
            elif (is_script or in_code_block) and (stripped.startswith("export ") or _ONLY_ASSIGNMENTS.fullmatch(
                    stripped)):
                # A launch script's exports, or a README code block that lists the run's settings one per line.
                scope = stripped
            else:
                continue
            for name, value in _ENV_ASSIGNMENT.findall(scope):
                resolved = _shell_value(value.strip("\"'"))
                if resolved is not None:
                    values.setdefault(name, set()).add(resolved)
                    used = True
        if used:
            sources.append(path.name)
    agreed = {name: next(iter(found)) for name, found in values.items() if len(found) == 1}
    return agreed, sources


# ----------------------------------------------------------------------------------------------------------------
# Following siblings
# ----------------------------------------------------------------------------------------------------------------


def _strings(node: ast.AST) -> list[str]:
    return [sub.value for sub in ast.walk(node) if isinstance(sub, ast.Constant) and isinstance(sub.value, str)]


def _imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if node.module:
        return [node.module.split(".")[0]]
    # "from . import x" in a record folder names sibling modules directly.
    return [alias.name for alias in node.names] if node.level else []


def references(tree: ast.Module, siblings: dict[str, Path]) -> list[tuple[Path, str, int]]:
    """(sibling, how, line) for every folder Python file that ``tree`` execs, imports or names.

    ``siblings`` maps both file names (``x.py``) and module names (``x``) to the files of the folder.
    """
    found: list[tuple[Path, str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for module in _imported_modules(node):
                if module in siblings:
                    found.append((siblings[module], "imported", node.lineno))
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            named = [siblings[Path(text).name] for text in _strings(node) if Path(text).name in siblings
                     and text.endswith(".py")]
            if not named:
                continue
            if name in {"exec", "run_path", "run_module", "compile", "spec_from_file_location", "import_module"}:
                how = "exec'd"
            elif name in {"run", "Popen", "call", "check_call", "check_output", "system", "execv", "execvp"}:
                how = "run as a subprocess"
            else:
                how = "read"
            # For __file__.replace("train_gpt.py", "other.py") the last name is the one opened.
            found.append((named[-1], how, node.lineno))
    return found


def foreign_strings(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, first line of the text) for string constants that hold C / C++ / CUDA source."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 80 and \
                _FOREIGN_TEXT.search(node.value):
            found.append((node.lineno, node.value.strip().splitlines()[0][:60]))
    return found


def record_log_lines(files: list[Path]) -> tuple[list[Path], list[str]]:
    """The record's training logs (``*.log``, ``*.txt`` other than requirements / notes) and their lines, bounded."""
    logs: list[Path] = []
    lines: list[str] = []
    budget = MAX_LOG_BYTES
    for path in files:
        name = path.name.lower()
        if path.suffix.lower() not in {".log", ".txt"} or name.startswith(("requirements", "readme", "license")):
            continue
        try:
            with path.open("rb") as handle:
                data = handle.read(min(budget, MAX_LOG_FILE_BYTES))
        except OSError:
            continue
        budget -= len(data)
        logs.append(path)
        lines += data.decode("utf-8", errors="replace").splitlines()
        if budget <= 0:
            break
    return logs, lines


def run_data_files(run_env: dict[str, str]) -> list[tuple[str, str]]:
    """(name, value) of run-command settings that hand the run a data file (``PAID_PREFIX_FILE=prefix.xz``).

    Dataset shards, the tokenizer and the run's own model output (``final_model.*``) are the standard inputs of
    every record, not extra data."""
    found = []
    for name, value in sorted(run_env.items()):
        base = value.rsplit("/", 1)[-1]
        if _DATA_FILE.search(base) and not base.startswith(("final_model", "fineweb_")) and "*" not in base:
            found.append((name, value))
    return found


def not_analysed(path: str, line: int, code: str, what: str) -> Finding:
    return Finding(
        "NA", "scope", path, line, code, "medium",
        f"{what} is not analysed: the scanner reads Python only, so a violation written there would pass unseen "
        "(review it by hand)",
    )
