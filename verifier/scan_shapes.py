"""Rules that read one function's code shape, without the data flow of ``scan_flow``.

* P5 (metric), the byte table: bits per byte divide by the UTF-8 bytes of every scored token, looked up in tables
  built from the tokenizer's pieces. The reference builder counts a piece's leading "▁" in a separate
  has-leading-space table (added at scoring time only where the previous token is no boundary) and counts a
  byte-fallback piece (``<0x41>``) as one byte. A builder that also counts the space in the base table counts it
  twice; one that never asks ``is_byte`` counts ``<0x41>`` as six bytes. Both inflate the byte count, so bpb is
  understated.
* NA (not analysed), pooled positions: a ``reshape(B, T // f, f, D)`` merges groups of adjacent positions into one
  representation. Whether every prediction still sees only earlier tokens then depends on how the groups are
  shifted and unmerged, which the scanner does not model: it says so instead of passing it.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator

from verifier.scan_findings import Finding

MakeFinding = Callable[[str, str, ast.AST, str, str], Finding]

_SPACE_MARKS = ("\u2581", "▁")


def _functions(nodes: list[ast.AST]) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _calls_method(node: ast.AST, name: str) -> bool:
    return any(isinstance(sub, ast.Attribute) and sub.attr == name for sub in ast.walk(node))


def _is_space_test(test: ast.expr) -> bool:
    """``piece.startswith("▁")``."""
    return isinstance(test, ast.Call) and isinstance(test.func, ast.Attribute) and test.func.attr == "startswith" \
        and any(isinstance(arg, ast.Constant) and arg.value in _SPACE_MARKS for arg in test.args)


def _flag_tables(function: ast.AST) -> set[str]:
    """Tables set to True per piece (``has_space[i] = True``): the separate leading-space table."""
    return {
        ast.unparse(target.value)
        for node in ast.walk(function) if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant) and node.value.value is True
        for target in node.targets if isinstance(target, ast.Subscript)
    }


def byte_table(nodes: list[ast.AST], make_finding: MakeFinding) -> list[Finding]:
    """``nodes``: every node of the module (``ModuleIndex.nodes``)."""
    findings: list[Finding] = []
    for function in _functions(nodes):
        if not _calls_method(function, "id_to_piece"):
            continue
        flags = _flag_tables(function)
        returns_tables = any(isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple)
                             and len(node.value.elts) >= 2 for node in ast.walk(function))
        if not flags or not returns_tables:
            continue  # not a (base bytes, has leading space, ...) table builder
        problems = []
        where: ast.AST = function
        space_branches = [node for node in ast.walk(function) if isinstance(node, ast.If) and _is_space_test(node.test)]
        for branch in space_branches if _adds_space_at_scoring(nodes) else []:
            for stmt in (node for block in branch.body for node in ast.walk(block)):
                if isinstance(stmt, (ast.Assign, ast.AugAssign)) and any(
                    isinstance(target, ast.Subscript) and ast.unparse(target.value) not in flags
                    for target in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
                ) and _adds_one(stmt.value if isinstance(stmt, ast.Assign) else stmt):
                    problems.append("the leading space is counted in the base byte table and again through the "
                                    "has-leading-space table at scoring time")
                    where = stmt
        if not _calls_method(function, "is_byte"):
            problems.append("byte-fallback pieces (<0xNN>) are never recognised (no is_byte), so each counts as "
                            "the length of its text instead of one byte")
        if problems:
            findings.append(make_finding(
                "P5", "metric", where, "high",
                f"the byte table built by {function.name}() miscounts bytes: " + "; ".join(problems)
                + " (the byte count is inflated, so bits per byte are understated)",
            ))
    return findings


def _adds_space_at_scoring(nodes: list[ast.AST]) -> bool:
    """Does scoring add a leading-space table entry on top of the base bytes (``tb += has_space_lut[tgt] & ...``)?"""
    for node in nodes:
        operands: list[ast.expr] = []
        if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
            operands = [node.value]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            operands = [node.left, node.right]
        for operand in operands:
            if any(isinstance(sub, ast.Subscript) and "space" in ast.unparse(sub.value).lower()
                   for sub in ast.walk(operand)):
                return True
    return False


def _adds_one(node: ast.AST) -> bool:
    if isinstance(node, ast.AugAssign):
        return isinstance(node.op, ast.Add) and isinstance(node.value, ast.Constant) and node.value.value == 1
    return any(
        isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Add)
        and any(isinstance(side, ast.Constant) and side.value == 1 for side in (sub.left, sub.right))
        for sub in ast.walk(node)
    )


def pooled_positions(nodes: list[ast.AST], make_finding: MakeFinding) -> list[Finding]:
    findings: list[Finding] = []
    for node in nodes:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"reshape", "view"}):
            continue
        args = node.args
        for first, second in zip(args, args[1:], strict=False):
            if isinstance(first, ast.BinOp) and isinstance(first.op, ast.FloorDiv) and \
                    ast.dump(first.right) == ast.dump(second):
                findings.append(make_finding(
                    "NA", "C1", node, "medium",
                    f"groups of {ast.unparse(second)} adjacent positions are merged into one here: whether each "
                    "prediction still sees only earlier tokens depends on how the groups are shifted and unmerged, "
                    "which is not analysed (review the architecture's causality by hand)",
                ))
                break
    return findings
