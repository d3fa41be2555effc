"""Which code runs by default: environment-variable defaults, shadowed branches and reachability.

Upstream scripts are configured through ``os.environ.get("NAME", "default")`` and carry many experimental code
paths. A finding in code that never runs must not fail a submission, but a feature that is merely switched off by
default (``TTT_ENABLED=0``, enabled in the run command) may well be what produced the reported number. So the
scanner only lowers its confidence when

* the code is unreachable from the script's entry point (nothing calls it), or
* the code sits in a branch that the defaults switch off: the branch's condition evaluates, from the literal
  defaults (environment-variable defaults included), to the other side (``if h.slot_enabled:`` with
  ``SLOT_ENABLED=0``, or the ``else:`` of ``if args.ttt_causal:`` with ``TTT_CAUSAL=1``). Such a finding is lowered
  one level, to medium: it stays visible, but it does not fail a submission whose reported run used the defaults.
  What the run really set is taken from the record's own run command when the folder documents one
  (``scan_folder``), so a feature that the submission's command switches on is not lowered.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

from verifier.scan_flow import FunctionInfo, ModuleIndex, dotted_name, top_level_code

UNKNOWN = object()


class ConfigDefaults:
    """Literal values of configuration names under the default environment (plus wrapper overrides)."""

    def __init__(self, index: ModuleIndex, overrides: dict[str, str]) -> None:
        self.index = index
        self.overrides = overrides
        self.values: dict[str, object] = {}
        for target, value in self._config_assignments():
            evaluated = self.evaluate(value) if value is not None else UNKNOWN
            previous = self.values.get(target, evaluated)
            self.values[target] = evaluated if previous == evaluated else UNKNOWN

    def _config_assignments(self) -> Iterator[tuple[str, ast.expr | None]]:
        """Every binding of a plain name or attribute; ``None`` for bindings that are not configuration literals.

        A name counts as configuration only if *all* its bindings are literals or environment reads that agree;
        one computed assignment anywhere (``flag = measure()``, ``args.x = 65536``) makes its default unknown.
        """
        for node in self.index.nodes:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            elif isinstance(node, ast.AugAssign):
                target, value = node.target, None
            else:
                continue
            name = target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) \
                else None
            if name is None:
                continue
            literal = isinstance(value, ast.Constant) or (value is not None and reads_environment(value))
            yield name, value if literal else None

    def evaluate(self, node: ast.expr | None) -> object:
        try:
            return self._evaluate(node, 0)
        except (TypeError, ValueError, ArithmeticError, AttributeError):
            return UNKNOWN

    def _evaluate(self, node: ast.expr | None, depth: int) -> object:
        if node is None or depth > 20:
            return UNKNOWN
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self.values.get(node.id, UNKNOWN)
        if isinstance(node, ast.Attribute):
            return self.values.get(node.attr, UNKNOWN)
        if isinstance(node, ast.UnaryOp):
            operand = self._evaluate(node.operand, depth + 1)
            if operand is UNKNOWN:
                return UNKNOWN
            if isinstance(node.op, ast.Not):
                return not operand
            if isinstance(node.op, ast.USub):
                return -operand  # type: ignore[operator]
            return UNKNOWN
        if isinstance(node, ast.BoolOp):
            values = [self._evaluate(value, depth + 1) for value in node.values]
            if isinstance(node.op, ast.And):
                if any(value is not UNKNOWN and not value for value in values):
                    return False
                return UNKNOWN if any(value is UNKNOWN for value in values) else values[-1]
            if any(value is not UNKNOWN and value for value in values):
                return True
            return UNKNOWN if any(value is UNKNOWN for value in values) else values[-1]
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            left = self._evaluate(node.left, depth + 1)
            right = self._evaluate(node.comparators[0], depth + 1)
            if left is UNKNOWN or right is UNKNOWN:
                return UNKNOWN
            return _compare(node.ops[0], left, right)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = [self._evaluate(element, depth + 1) for element in node.elts]
            return UNKNOWN if any(item is UNKNOWN for item in items) else tuple(items)
        if isinstance(node, ast.IfExp):
            test = self._evaluate(node.test, depth + 1)
            if test is UNKNOWN:
                return UNKNOWN
            return self._evaluate(node.body if test else node.orelse, depth + 1)
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        return UNKNOWN

    def _call(self, node: ast.Call, depth: int) -> object:
        name = dotted_name(node.func)
        if name.endswith(("environ.get", "getenv")) and node.args:
            key = self._evaluate(node.args[0], depth + 1)
            if isinstance(key, str) and key in self.overrides:
                return self.overrides[key]
            return self._evaluate(node.args[1], depth + 1) if len(node.args) > 1 else None
        if name in {"int", "float", "bool", "str"} and len(node.args) == 1:
            value = self._evaluate(node.args[0], depth + 1)
            if value is UNKNOWN:
                return UNKNOWN
            return {"int": int, "float": float, "bool": bool, "str": str}[name](value)  # type: ignore[operator]
        if isinstance(node.func, ast.Attribute) and node.func.attr in {"lower", "upper", "strip"} and not node.args:
            value = self._evaluate(node.func.value, depth + 1)
            return getattr(value, node.func.attr)() if isinstance(value, str) else UNKNOWN
        return UNKNOWN

    def truth(self, test: ast.expr) -> bool | None:
        """The default truth value of an ``if`` test, or None when it cannot be decided statically."""
        value = self.evaluate(test)
        if value is UNKNOWN:
            return None
        try:
            return bool(value)
        except (TypeError, ValueError):
            return None


def reads_environment(node: ast.expr) -> bool:
    return any(
        isinstance(sub, ast.Call) and dotted_name(sub.func).endswith(("environ.get", "getenv"))
        for sub in ast.walk(node)
    )


def _contains(root: ast.AST, node: ast.AST) -> bool:
    return any(sub is node for sub in ast.walk(root))


def _compare(op: ast.cmpop, left: object, right: object) -> object:
    if isinstance(op, ast.Eq):
        return left == right
    if isinstance(op, ast.NotEq):
        return left != right
    if isinstance(op, ast.In):
        return left in right  # type: ignore[operator]
    if isinstance(op, ast.NotIn):
        return left not in right  # type: ignore[operator]
    if isinstance(op, ast.Gt):
        return left > right  # type: ignore[operator]
    if isinstance(op, ast.GtE):
        return left >= right  # type: ignore[operator]
    if isinstance(op, ast.Lt):
        return left < right  # type: ignore[operator]
    if isinstance(op, ast.LtE):
        return left <= right  # type: ignore[operator]
    if isinstance(op, ast.Is):
        return left is right
    if isinstance(op, ast.IsNot):
        return left is not right
    return UNKNOWN


class LogEvidence:
    """Which of the script's own log lines the record's training logs contain.

    A branch that the defaults switch off may still be what produced the reported number when the run command
    switched it on; the logs show it when the lines the branch prints are there. Only log lines are compared, at
    the start of a line (an upstream ``logs/*.txt`` opens with the script source, where the same text sits inside
    a ``print(...)`` call mid-line), and only literal prefixes of at least ``MIN_PREFIX`` characters count.
    """

    MIN_PREFIX = 10
    MAX_PREFIX = 40

    def __init__(self, lines: list[str]) -> None:
        self._starts: dict[int, set[str]] = {}
        self._lines = [line.lstrip() for line in lines if line.strip()]

    def printed(self, prefix: str) -> bool:
        prefix = prefix[:self.MAX_PREFIX]
        if len(prefix) < self.MIN_PREFIX:
            return False
        starts = self._starts.get(len(prefix))
        if starts is None:
            starts = {line[:len(prefix)] for line in self._lines}
            self._starts[len(prefix)] = starts
        return prefix in starts


_LOG_FUNCTIONS = frozenset({"print", "log", "log0", "info", "warning", "print0", "logger", "_log", "log_rank0"})


def log_prefix(call: ast.Call) -> str | None:
    """The literal text a print / log call starts its line with (``"ngram_chunk ["`` for
    ``log0(f"  ngram_chunk [{i}/{n}] ...")``), or None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in _LOG_FUNCTIONS or not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.Call) and isinstance(first.func, ast.Attribute) and first.func.attr == "format":
        first = first.func.value  # "template {}".format(...) from a normalised 3.12 f-string
    text = None
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        text = first.value.split("{")[0]
    elif isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
        text = str(first.values[0].value)
    if text is None:
        return None
    text = text.lstrip().split("\n")[0]
    return text if any(char.isalpha() for char in text) else None


class RunContext:
    """Answers "does this node run under the default configuration?" for the detectors."""

    def __init__(self, index: ModuleIndex, defaults: ConfigDefaults, evidence: LogEvidence | None = None) -> None:
        self.index = index
        self.defaults = defaults
        self.evidence = evidence
        self._reachable_default, self._reachable_any, self._has_entry = self._reachability()
        self._ran = self._functions_shown_to_run()

    def _logged_in(self, nodes: list[ast.AST]) -> bool:
        if self.evidence is None:
            return False
        for node in nodes:
            if isinstance(node, ast.Call):
                prefix = log_prefix(node)
                if prefix is not None and self.evidence.printed(prefix):
                    return True
        return False

    def _functions_shown_to_run(self) -> set[FunctionInfo]:
        """Functions whose own log lines are in the record's logs, and everything they call."""
        if self.evidence is None:
            return set()
        ran = {info for info in self.index.functions if self._logged_in(self.index.local_nodes(info.node.body))}
        pending = list(ran)
        while pending:
            owner = pending.pop()
            for target, _ in self._references(owner, owner.node.body):
                if target not in ran:
                    ran.add(target)
                    pending.append(target)
        return ran

    def _branch_ran(self, branch: ast.If, node: ast.AST) -> bool:
        """Did the logs show the side of ``branch`` that holds ``node`` running?"""
        side = branch.body if any(_contains(stmt, node) for stmt in branch.body) else branch.orelse
        nodes = [sub for stmt in side for sub in ast.walk(stmt)]
        if self._logged_in(nodes):
            return True
        called = {target for stmt in side for target, _ in self._references(None, [stmt])}
        return any(info in self._ran and self._logged_in(self.index.local_nodes(info.node.body)) for info in called)

    def shadowing_branch(self, node: ast.AST) -> ast.If | None:
        """The ``if`` whose default outcome sends control to a different, non-empty branch than ``node``'s."""
        child, current = node, self.index.parents.get(node)
        while current is not None and not isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
            if isinstance(current, ast.If):
                truth = self.defaults.truth(current.test)
                if truth is not None:
                    in_body = child in current.body
                    in_else = child in current.orelse
                    if in_body and truth is False:
                        return current
                    if in_else and truth is True:
                        return current
            child, current = current, self.index.parents.get(current)
        return None

    def downgrade(self, node: ast.AST) -> tuple[int, str]:
        """How many confidence levels a finding at ``node`` loses, and why."""
        function = self.index.enclosing_function(node)
        if self._has_entry and function is not None and function not in self._reachable_any:
            return 2, f"in {function.qualname}, which nothing in the script calls"
        branch = self.shadowing_branch(node)
        if branch is not None and not self._branch_ran(branch, node):
            return 1, f"only when `{ast.unparse(branch.test)}` differs from its default (line {branch.lineno})"
        if self._has_entry and function is not None and function not in self._reachable_default \
                and function not in self._ran:
            return 1, f"{function.qualname} is only called from branches that are off by default"
        return 0, ""

    # -- call graph -------------------------------------------------------------------------------------------

    def _reachability(self) -> tuple[set[FunctionInfo], set[FunctionInfo], bool]:
        edges: dict[FunctionInfo | None, list[tuple[FunctionInfo, bool]]] = {}
        for owner, body in self._bodies():
            edges[owner] = list(self._references(owner, body))
        has_entry = bool(edges.get(None))

        def closure(follow_shadowed: bool) -> set[FunctionInfo]:
            seen: set[FunctionInfo] = set()
            pending: list[FunctionInfo | None] = [None]
            while pending:
                owner = pending.pop()
                for target, shadowed in edges.get(owner, []):
                    if target in seen or (shadowed and not follow_shadowed):
                        continue
                    seen.add(target)
                    pending.append(target)
            return seen

        return closure(False), closure(True), has_entry

    def _bodies(self) -> Iterator[tuple[FunctionInfo | None, list[ast.stmt]]]:
        yield None, top_level_code(self.index.tree, with_classes=False)
        for info in self.index.functions:
            yield info, info.node.body

    def _references(self, owner: FunctionInfo | None, body: list[ast.stmt]) -> Iterator[tuple[FunctionInfo, bool]]:
        visible = dict(self.index.module_funcs)
        if owner is not None:
            visible.update(self.index.nested_in(owner))
        methods: dict[str, list[FunctionInfo]] = {}
        for info in self.index.functions:
            if info.class_name is not None:
                methods.setdefault(info.name, []).append(info)
        for stmt in body:
            for node in ast.walk(stmt):
                targets: list[FunctionInfo] = []
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                    if node.id in visible:
                        targets.append(visible[node.id])
                    if node.id in self.index.classes:
                        targets.extend(
                            info for info in self.index.functions
                            if info.class_name == node.id and (info.name.startswith("__") or info.name == "forward")
                        )
                elif isinstance(node, ast.Attribute):
                    targets.extend(methods.get(node.attr, []))
                for target in targets:
                    if target is not owner:
                        yield target, self.shadowing_branch(node) is not None
