"""P3: the order of adaptation and scoring on validation tokens (conditions C3 and C4).

Each function is reduced to *events* placed in its statement tree:

* ``train``   an optimizer step (or a manual ``p -= lr * p.grad``) whose backward pass consumed some data;
* ``score``   a loss / NLL accumulated into a variable that reaches the function's result or a bpb log line;
* ``discard`` a forward pass on validation data under ``inference_mode`` / ``no_grad`` whose output is dropped.

Calls to functions of the same file become events too, through per-function summaries (a TTT helper that trains,
an ``eval_val*`` that scores), with the callee's ``param:NAME`` placeholders replaced by the caller's arguments.
The rules then compare positions:

* in one loop iteration a validation score taken after a validation update (adapt-then-score, SLOT, rescoring);
* scores taken inside a multi-epoch adaptation loop (final-epoch scoring, every-epoch scoring);
* a discarded "score" phase followed by training (the PR #761 fork pattern);
* a persistent adaptation on validation tokens followed, later in the same function, by scoring;
* scoring again after a score-first TTT pass, a cache filled from the whole validation stream before scoring,
  and an element-wise minimum / oracle choice between two per-token losses.

The legal score-first loop - score chunk c, accumulate, then train on chunk c - produces a score event before the
train event inside the chunk loop and no finding.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from verifier.scan_findings import Finding
from verifier.scan_flow import (
    GOLDLP,
    LOCAL,
    LOSS,
    MIXED,
    OPTIM,
    TOK,
    VAL,
    FunctionFlow,
    FunctionInfo,
    Labels,
    ModuleFlow,
    ModuleIndex,
    bind_arguments,
    call_basename,
    dotted_name,
    is_val_name,
    names_in,
    params_in,
    receiver,
    root_name,
    substitute,
    top_level_code,
    walk_local,
)

_OPTIMIZER_NAME = re.compile(r"(^|_)(opt|optim|optimi[sz]er|optimi[sz]ers|opts)(_|$|\d)", re.IGNORECASE)
_NOT_OPTIMIZER = re.compile(r"sched|lr_|warmup|swa|ema|scaler_state", re.IGNORECASE)
_EPOCH_VAR = re.compile(r"_*(ep|epoch|epochs|pass|passes|rep|repeat|round|sweep)(_?(i|idx|id|num|n|no))?\d*")
_EPOCH_ITER = re.compile(r"epoch|pass(es)?\b|repeat|n_rounds|sweeps", re.IGNORECASE)
_LAST = re.compile(r"last|final", re.IGNORECASE)
_QUIET_CALLS = frozenset({
    "print", "log0", "log", "info", "debug", "warning", "all_reduce", "barrier", "synchronize", "append",
    "extend", "zero_grad", "eval", "train", "requires_grad_", "set_", "copy_", "fill_", "zero_",
})
_PREFILL = re.compile(r"^(update|add|add_tokens|prefill|fill|build|fit|observe|ingest|count|warm|prime)\w*$")
_PERSIST = re.compile(r"save|quantiz|serializ|compress|export|pack|write", re.IGNORECASE)
_REPORT = re.compile(r"bpb|val_loss|bits_per_byte", re.IGNORECASE)


@dataclass
class Event:
    kind: str  # "train" | "score" | "discard"
    node: ast.AST  # where it happens (a call or a statement)
    deps: Labels  # labels of the data consumed (backward receivers / accumulated values / forward inputs)
    persistent: bool = True  # train: the updated parameters outlive the function (not a throwaway LoRA / delta)
    via: FunctionInfo | None = None  # call-site events: the callee that does the work
    logged: bool = False  # score: the function itself logs it (rather than only returning it)


@dataclass
class OrderSummary:
    train_deps: Labels = frozenset()
    persistent: bool = False
    score_deps: Labels = frozenset()
    score_first: bool = False  # scores each chunk before training on it (the legal TTT shape)
    logs_score: bool = False  # writes its score to a bpb / val_loss log line itself
    # Parameters the function adds a loss into in place (``loss_sum += nll.sum()`` on the caller's tensor), with
    # the labels of what it adds: the caller's accumulator is scored through them.
    accumulates: tuple[tuple[str, Labels], ...] = ()

    def key(self) -> tuple[Labels, bool, Labels, bool, bool, tuple[tuple[str, Labels], ...]]:
        return self.train_deps, self.persistent, self.score_deps, self.score_first, self.logs_score, self.accumulates


@dataclass
class FunctionEvents:
    info: FunctionInfo | None
    events: list[Event] = field(default_factory=list)
    accumulates: dict[str, Labels] = field(default_factory=dict)  # see OrderSummary.accumulates

    def of(self, kind: str) -> list[Event]:
        return [event for event in self.events if event.kind == kind]


# ----------------------------------------------------------------------------------------------------------------
# Positions in the statement tree
# ----------------------------------------------------------------------------------------------------------------


class Positions:
    """Statement paths, loop nesting and program order of nodes inside one function."""

    def __init__(self, index: ModuleIndex) -> None:
        self.index = index

    def statement(self, node: ast.AST) -> ast.AST:
        current = node
        while current is not None and not isinstance(current, ast.stmt):
            current = self.index.parents.get(current)
        return current if current is not None else node

    def path(self, node: ast.AST) -> list[tuple[ast.AST, str, int]]:
        """(container, block field, index in block) from the function body down to ``node``'s statement."""
        steps: list[tuple[ast.AST, str, int]] = []
        child = self.statement(node)
        parent = self.index.parents.get(child)
        while parent is not None:
            for field_name in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(parent, field_name, None)
                if isinstance(block, list) and child in block:
                    steps.append((parent, field_name, block.index(child)))
                    break
            if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
                break
            child, parent = parent, self.index.parents.get(parent)
        return list(reversed(steps))

    def order(self, first: ast.AST, second: ast.AST) -> int | None:
        """-1 if ``first`` runs before ``second`` in one pass, 1 if after, None if exclusive or not comparable
        (the two branches of one ``if``, or two nodes of the same statement)."""
        for (container_a, field_a, index_a), (container_b, field_b, index_b) in zip(
            self.path(first), self.path(second), strict=False
        ):
            if container_a is not container_b:
                return None
            if field_a != field_b:
                # A loop's body runs before its else block; the branches of an if / try are exclusive.
                if isinstance(container_a, (ast.For, ast.While, ast.AsyncFor)):
                    return -1 if field_a == "body" else 1
                return None
            if index_a != index_b:
                return -1 if index_a < index_b else 1
        return None

    def loops(self, node: ast.AST) -> list[ast.For | ast.While | ast.AsyncFor]:
        """Enclosing loops of ``node`` inside its function, innermost first."""
        found = []
        current = self.index.parents.get(node)
        while current is not None and not isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
            if isinstance(current, (ast.For, ast.While, ast.AsyncFor)):
                found.append(current)
            current = self.index.parents.get(current)
        return found

    def common_loops(self, a: ast.AST, b: ast.AST) -> list[ast.For | ast.While | ast.AsyncFor]:
        loops_b = {id(loop) for loop in self.loops(b)}
        return [loop for loop in self.loops(a) if id(loop) in loops_b]

    def guards_between(self, node: ast.AST, outer: ast.AST) -> list[ast.If]:
        """The ``if`` statements between ``node`` and an enclosing ``outer`` node."""
        found = []
        current = self.index.parents.get(node)
        while current is not None and current is not outer:
            if isinstance(current, ast.If):
                found.append(current)
            current = self.index.parents.get(current)
        return found


# ----------------------------------------------------------------------------------------------------------------
# Event extraction
# ----------------------------------------------------------------------------------------------------------------


class OrderAnalysis:
    def __init__(self, index: ModuleIndex, module_flow: ModuleFlow) -> None:
        self.index = index
        self.flow = module_flow
        self.positions = Positions(index)
        self._top_level = top_level_code(index.tree, with_classes=False)
        self._reported_cache: dict[FunctionInfo | None, tuple[set[str], set[str]]] = {}
        self.summaries: dict[FunctionInfo, OrderSummary] = {info: OrderSummary() for info in index.functions}
        self.val_params: dict[FunctionInfo, set[str]] = {info: set() for info in index.functions}
        self.callers: dict[FunctionInfo, set[FunctionInfo | None]] = {info: set() for info in index.functions}
        self.reported: dict[FunctionInfo | None, set[str]] = {}
        self.logged: dict[FunctionInfo | None, set[str]] = {}
        for info in [None, *index.functions]:
            self.reported[info], self.logged[info] = self._reported_names(info)
        self.events: dict[FunctionInfo | None, FunctionEvents] = {}
        for _ in range(6):
            before = {info: summary.key() for info, summary in self.summaries.items()}
            params_before = {info: set(names) for info, names in self.val_params.items()}
            self.events = {info: self._extract(info) for info in [None, *index.functions]}
            for info in index.functions:
                self.summaries[info] = self._summarise(info, self.events[info])
            if before == {i: s.key() for i, s in self.summaries.items()} and params_before == self.val_params:
                break

    # -- helpers -----------------------------------------------------------------------------------------------

    def flow_for(self, info: FunctionInfo | None) -> FunctionFlow:
        return self.flow.flows[info]

    def is_val(self, deps: Labels, info: FunctionInfo | None) -> bool:
        if VAL in deps:
            return True
        return info is not None and bool(params_in(deps) & self.val_params.get(info, set()))

    def _body(self, info: FunctionInfo | None) -> list[ast.stmt]:
        if info is None:
            return self._top_level
        return info.node.body

    def _nodes(self, info: FunctionInfo | None) -> list[ast.AST]:
        return self.index.local_nodes(self._body(info))

    def _reported_names(self, info: FunctionInfo | None) -> tuple[set[str], set[str]]:
        """Names whose value reaches the function's return value or a log line mentioning bpb / val_loss, and
        the subset that reaches such a log line (the function reports the score itself).

        Nested functions are included in their outermost function's graph: a closure that accumulates into the
        outer ``loss_sum`` reports through the outer function's ``return``.
        """
        outermost = info
        while outermost is not None and outermost.parent is not None:
            outermost = outermost.parent
        if outermost in self._reported_cache:
            return self._reported_cache[outermost]
        body = self._body(outermost)
        flows_to: dict[str, set[str]] = {}
        returned: set[str] = set()
        logged: set[str] = set()

        def edge(sources: set[str], target: str | None) -> None:
            if target is None:
                return
            for source in sources:
                flows_to.setdefault(source, set()).add(target)

        for stmt in body:
            for node in ast.walk(stmt):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        for name in names_in(target):
                            edge(names_in(node.value), name)
                elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                    edge(names_in(node.value), root_name(node.target))
                elif isinstance(node, ast.Return) and node.value is not None:
                    returned |= names_in(node.value)
                elif isinstance(node, ast.Call):
                    name = call_basename(node)
                    recv = receiver(node)
                    if name in {"add_", "append", "extend", "copy_", "update", "index_add_", "scatter_add_"} and recv:
                        edge({n for arg in node.args for n in names_in(arg)}, root_name(recv))
                    if any(_mentions_report(arg) for arg in [*node.args, *(kw.value for kw in node.keywords)]):
                        logged |= {n for arg in node.args for n in names_in(arg)}
        reverse: dict[str, set[str]] = {}
        for source, targets in flows_to.items():
            for target in targets:
                reverse.setdefault(target, set()).add(source)

        def sources_of(sinks: set[str]) -> set[str]:
            reached, pending = set(sinks), list(sinks)
            while pending:
                for source in reverse.get(pending.pop(), set()):
                    if source not in reached:
                        reached.add(source)
                        pending.append(source)
            return reached

        via_log = sources_of(logged)
        self._reported_cache[outermost] = (sources_of(returned) | via_log, via_log)
        return self._reported_cache[outermost]

    # -- extraction --------------------------------------------------------------------------------------------

    def _extract(self, info: FunctionInfo | None) -> FunctionEvents:
        flow = self.flow_for(info)
        result = FunctionEvents(info)
        nodes = self._nodes(info)
        backward_calls = [
            node for node in nodes
            if isinstance(node, ast.Call) and (
                (call_basename(node) == "backward" and receiver(node) is not None)
                or dotted_name(node.func).endswith("autograd.grad")
            )
        ]
        for node in nodes:
            if isinstance(node, ast.Call):
                self._train_event(node, flow, backward_calls, result)
                self._score_call_event(node, flow, info, result)
                self._callee_events(node, flow, info, result)
            elif isinstance(node, (ast.AugAssign, ast.Assign)):
                self._score_statement_event(node, flow, info, result)
            if isinstance(node, (ast.With, ast.AsyncWith)) and _is_no_grad(node):
                self._discard_events(node, flow, info, result)
        result.events.sort(key=lambda event: (_line(event.node), getattr(event.node, "col_offset", 0)))
        return result

    def _train_event(self, call: ast.Call, flow: FunctionFlow, backward_calls: list[ast.Call],
                     result: FunctionEvents) -> None:
        name = call_basename(call)
        recv = receiver(call)
        updated: ast.expr | None = None
        if name == "step" and recv is not None and self._is_optimizer(recv, flow):
            updated = recv
        elif name == "step" and recv is not None and call.args and self._is_optimizer(call.args[0], flow):
            updated = call.args[0]  # scaler.step(optimizer)
        elif name in {"add_", "sub_", "copy_", "addcmul_", "addcdiv_"} and recv is not None and any(
            _mentions_grad(arg) for arg in call.args
        ):
            updated = recv  # manual SGD: p.data.add_(p.grad, alpha=-lr)
        if updated is None:
            return
        loops = self.positions.loops(call)
        scope: ast.AST | None = loops[0] if loops else None
        in_scope = [b for b in backward_calls if scope is None or _inside(b, scope, self.index)]
        if not in_scope:
            in_scope = backward_calls
        deps = frozenset().union(*(flow.of(_backward_source(b)) for b in in_scope)) if in_scope else frozenset()
        held = flow.of(updated)
        persistent = not (LOCAL in held and not params_in(held))
        result.events.append(Event("train", call, deps, persistent))

    def _manual_update_event(self, stmt: ast.AugAssign, flow: FunctionFlow, result: FunctionEvents) -> None:
        if isinstance(stmt.op, ast.Sub) and _mentions_grad(stmt.value):
            held = flow.of(stmt.target)
            result.events.append(Event("train", stmt, flow.of(stmt.value), not (LOCAL in held and not params_in(held))))

    def _is_optimizer(self, node: ast.expr, flow: FunctionFlow) -> bool:
        if OPTIM in flow.of(node):
            return True
        text = ast.unparse(node)
        last = text.rsplit(".", 1)[-1]
        return bool(_OPTIMIZER_NAME.search(last)) and not _NOT_OPTIMIZER.search(text)

    def _score_statement_event(self, stmt: ast.AugAssign | ast.Assign, flow: FunctionFlow,
                               info: FunctionInfo | None, result: FunctionEvents) -> None:
        if isinstance(stmt, ast.AugAssign):
            self._manual_update_event(stmt, flow, result)
            if not isinstance(stmt.op, ast.Add):
                return
            accumulator, value = root_name(stmt.target), stmt.value
        else:
            subscripts = [t for t in stmt.targets if isinstance(t, ast.Subscript)]
            if not subscripts:
                return
            accumulator, value = root_name(subscripts[0]), stmt.value
        self._maybe_score(stmt, accumulator, value, flow, info, result)

    def _score_call_event(self, call: ast.Call, flow: FunctionFlow, info: FunctionInfo | None,
                          result: FunctionEvents) -> None:
        recv = receiver(call)
        if call_basename(call) in {"add_", "append", "extend"} and recv is not None and call.args:
            self._maybe_score(call, root_name(recv), call.args[0], flow, info, result)

    def _maybe_score(self, node: ast.AST, accumulator: str | None, value: ast.expr, flow: FunctionFlow,
                     info: FunctionInfo | None, result: FunctionEvents) -> None:
        labels = flow.of(value)
        if accumulator is None or not labels & {LOSS, GOLDLP, MIXED}:
            return
        if accumulator not in self.reported[info]:
            self._note_accumulation(info, accumulator, labels, result)
            return
        if not (VAL in labels or params_in(labels)):
            return
        result.events.append(Event("score", node, labels, logged=accumulator in self.logged[info]))

    def _note_accumulation(self, info: FunctionInfo | None, accumulator: str, labels: Labels,
                           result: FunctionEvents) -> None:
        """A loss added in place into one of the function's own parameters scores into the caller's state."""
        if info is not None and accumulator in info.all_params:
            result.accumulates[accumulator] = result.accumulates.get(accumulator, frozenset()) | labels

    def _caller_accumulations(self, call: ast.Call, callee: FunctionInfo, bound: dict[str, ast.expr],
                              flow: FunctionFlow) -> list[tuple[str, Labels]]:
        """(caller variable, labels of the loss added into it) for each accumulator the callee writes into."""
        found = []
        for param, labels in self.summaries[callee].accumulates:
            arg = bound.get(param)
            name = root_name(arg) if arg is not None else None
            deps = substitute(labels, bound, flow.labels)
            if name is not None and deps & {LOSS, GOLDLP, MIXED}:
                found.append((name, deps))
        return found

    def _scores_into_reported(self, call: ast.Call, info: FunctionInfo | None, flow: FunctionFlow) -> bool:
        callee = self.index.resolve_call(call, info)
        if callee is None:
            return False
        accumulations = self._caller_accumulations(call, callee, bind_arguments(call, callee), flow)
        return any(name in self.reported[info] for name, _ in accumulations)

    def _callee_events(self, call: ast.Call, flow: FunctionFlow, info: FunctionInfo | None,
                       result: FunctionEvents) -> None:
        targets: list[tuple[FunctionInfo, dict[str, ast.expr], bool]] = []
        callee = self.index.resolve_call(call, info)
        if callee is not None:
            targets.append((callee, bind_arguments(call, callee), False))
        for position, arg in enumerate(call.args):
            # timed_eval("label", eval_val_sliding, h, model, ...): the wrapper runs and logs the passed function.
            if isinstance(arg, ast.Name) and arg.id in self.index.module_funcs:
                passed = self.index.module_funcs[arg.id]
                targets.append((passed, bind_arguments(call, passed, skip=position + 1), True))
        for target, bound, wrapped in targets:
            self.callers[target].add(info)
            for param, arg in bound.items():
                if self.is_val(flow.of(arg), info):
                    self.val_params[target].add(param)
            summary = self.summaries[target]
            if not wrapped:
                for name, deps in self._caller_accumulations(call, target, bound, flow):
                    if name in self.reported[info] and (VAL in deps or params_in(deps)):
                        result.events.append(Event("score", call, deps, via=target, logged=name in self.logged[info]))
                    else:
                        self._note_accumulation(info, name, deps, result)
            if summary.train_deps:
                deps = substitute(summary.train_deps, bound, flow.labels)
                result.events.append(Event("train", call, deps, summary.persistent, via=target))
            if summary.score_deps and (wrapped or self._result_reported(call, info, summary)):
                deps = substitute(summary.score_deps, bound, flow.labels)
                logged = wrapped or summary.logs_score  # a timing wrapper logs what the passed function returns
                result.events.append(Event("score", call, deps, via=target, logged=logged))

    def _result_reported(self, call: ast.Call, info: FunctionInfo | None, summary: OrderSummary) -> bool:
        """Does this call produce a kept score: the callee logs it itself, or its result is returned, logged or
        stored in a reported name? (A result assigned to names that are never used again is a discarded score.)"""
        if summary.logs_score:
            return True
        stmt = self.positions.statement(call)
        if isinstance(stmt, ast.Expr):
            return call is not stmt.value
        if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            return any(name in self.reported[info] for target in targets for name in names_in(target))
        return True

    def _discard_events(self, block: ast.With | ast.AsyncWith, flow: FunctionFlow, info: FunctionInfo | None,
                        result: FunctionEvents) -> None:
        inner = [node for stmt in block.body for node in walk_local(stmt)]
        for node in inner:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                call = node.value
                if call_basename(call) in _QUIET_CALLS or dotted_name(call.func).startswith(("dist.", "torch.cuda")):
                    continue
                if self._scores_into_reported(call, info, flow):
                    continue  # a helper adding the loss into the caller's accumulators is the score, not a discard
                deps = frozenset().union(*(flow.of(arg) for arg in call.args)) if call.args else frozenset()
                if self.is_val(deps, info):
                    result.events.append(Event("discard", node, deps))
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                names = {n for t in node.targets for n in names_in(t)}
                deps = frozenset().union(*(flow.of(arg) for arg in node.value.args)) if node.value.args else frozenset()
                if names and self.is_val(deps, info) and not self._used_after(names, node, info):
                    result.events.append(Event("discard", node, deps))

    def _used_after(self, names: set[str], stmt: ast.stmt, info: FunctionInfo | None) -> bool:
        loops = self.positions.loops(stmt)
        scope_nodes = [n for n in walk_local(loops[-1])] if loops else self._nodes(info)
        for node in scope_nodes:
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in names:
                if getattr(node, "lineno", 0) > stmt.lineno or (loops and node.lineno != stmt.lineno):
                    return True
        return False

    # -- summaries ---------------------------------------------------------------------------------------------

    def _summarise(self, info: FunctionInfo, events: FunctionEvents) -> OrderSummary:
        trains = events.of("train")
        scores = events.of("score")
        train_deps = frozenset().union(*(e.deps for e in trains)) if trains else frozenset()
        score_deps = frozenset().union(*(e.deps for e in scores)) if scores else frozenset()
        return OrderSummary(
            train_deps=train_deps,
            persistent=any(e.persistent for e in trains),
            score_deps=score_deps,
            score_first=bool(trains and scores) and self._scores_first(info, trains, scores),
            logs_score=any(e.logged for e in scores),
            accumulates=tuple(sorted(events.accumulates.items())),
        )

    def _scores_first(self, info: FunctionInfo, trains: list[Event], scores: list[Event]) -> bool:
        for train in trains:
            for score in scores:
                if self.positions.common_loops(train.node, score.node) and \
                        self.positions.order(score.node, train.node) == -1:
                    return True
        return False


# ----------------------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------------------


class OrderRules:
    def __init__(self, analysis: OrderAnalysis, make_finding) -> None:
        self.a = analysis
        self.finding = make_finding
        self.positions = analysis.positions

    def findings(self) -> list[Finding]:
        found: list[Finding] = []
        for info, events in self.a.events.items():
            found += self._in_loop(info, events)
            found += self._discarded_phase(info, events)
            found += self._adapt_then_score(info, events)
            found += self._prefilled_cache(info, events)
            found += self._min_over_passes(info)
        return found

    def _val_events(self, info: FunctionInfo | None, events: FunctionEvents, kind: str) -> list[Event]:
        return [e for e in events.of(kind) if self.a.is_val(e.deps, info)]

    def _in_loop(self, info: FunctionInfo | None, events: FunctionEvents) -> list[Finding]:
        found: list[Finding] = []
        seen: set[int] = set()  # one finding per loop: every score after the update shares the same cause
        trains = self._val_events(info, events, "train")
        for score in self._val_events(info, events, "score"):
            for train in trains:
                common = self.positions.common_loops(score.node, train.node)
                if not common or id(common[0]) in seen:
                    continue
                epoch_loop = next((loop for loop in common if _is_epoch_loop(loop)), None)
                if epoch_loop is not None:
                    verdict = self._epoch_guard(score.node, epoch_loop)
                    if verdict == "first":
                        continue
                    seen.add(id(common[0]))
                    if verdict == "last":
                        found.append(self.finding(
                            "P3", "C3/C4", score.node, "high",
                            f"the score is taken only on the final epoch of a multi-epoch adaptation loop "
                            f"(line {epoch_loop.lineno}): every scored token was trained on in earlier epochs",
                            related=train.node,
                        ))
                    else:
                        found.append(self.finding(
                            "P3", "C3/C4", score.node, "high",
                            f"scores are accumulated inside the multi-epoch adaptation loop at line "
                            f"{epoch_loop.lineno}: tokens are scored again after the model trained on them",
                            related=train.node,
                        ))
                    continue
                if self.positions.order(train.node, score.node) == -1:
                    if _trains_previous_chunk(train.node, common[0], self.a.index):
                        continue  # train on chunk c-1, then score chunk c: score-first, shifted by one
                    if self._fits_scored_prefix(info, train, score):
                        continue  # fit on y[:s], score [s:]: the fitted positions were scored by earlier windows
                    seen.add(id(common[0]))
                    found.append(self.finding(
                        "P3", "C3", score.node, "high",
                        f"validation tokens are scored after an update at line {_line(train.node)} in the same "
                        f"iteration of the loop at line {common[0].lineno} (adapt-then-score / rescoring)",
                        related=train.node,
                    ))
        return found

    def _fits_scored_prefix(self, info: FunctionInfo | None, train: Event, score: Event) -> bool:
        """Is the update fitted only on the positions before the ones scored next (``loss(logits[:s], y[:s])``
        then ``nll(logits[s:wlen], y[s:wlen])``)? In a sliding window the prefix ``[:s]`` is context that earlier
        windows already scored, so this is score-before-update, not adapt-then-score. Fitting on ``[s:wlen]``
        itself (SLOT) is not exempt."""
        definitions: dict[str, list[ast.expr]] = {}
        for node in self.a._nodes(info):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    for name in names_in(target):
                        definitions.setdefault(name, []).append(node.value)
        train_slices = _slices_feeding(_train_source(train.node, self.a._nodes(info)), definitions)
        score_value = score.node.value if isinstance(score.node, (ast.AugAssign, ast.Assign)) else score.node
        score_slices = _slices_feeding(score_value, definitions)
        scored_starts = {ast.dump(s.lower) for s in score_slices if s.lower is not None}
        if not train_slices or not scored_starts:
            return False
        for piece in train_slices:
            if piece.lower is not None and ast.dump(piece.lower) in scored_starts:
                return False  # trains on the scored range
            if piece.upper is None or ast.dump(piece.upper) not in scored_starts:
                return False
        return True

    def _epoch_guard(self, score: ast.AST, loop: ast.For | ast.While | ast.AsyncFor) -> str:
        """"first" if the score is taken only when the epoch counter is 0, "last" if only on the final epoch."""
        target = loop.target if isinstance(loop, (ast.For, ast.AsyncFor)) else None
        var = target.id if isinstance(target, ast.Name) else None
        for guard in self.positions.guards_between(score, loop):
            test = guard.test
            text = ast.unparse(test)
            if var is not None and var not in names_in(test) and not _LAST.search(text):
                continue
            if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
                other = test.comparators[0] if var in names_in(test.left) else test.left
                if isinstance(other, ast.Constant) and other.value == 0:
                    return "first"
                return "last"
            if isinstance(test, ast.Compare) and isinstance(test.ops[0], (ast.GtE, ast.Gt)):
                return "last"
            if _LAST.search(text):
                return "last"
        return "every"

    def _discarded_phase(self, info: FunctionInfo | None, events: FunctionEvents) -> list[Finding]:
        found: list[Finding] = []
        trains = self._val_events(info, events, "train")
        scores = self._val_events(info, events, "score")
        reported: set[int] = set()
        for discard in events.of("discard"):
            for train in trains:
                common = self.positions.common_loops(discard.node, train.node)
                if not common or self.positions.order(discard.node, train.node) != -1:
                    continue
                loop = common[0]
                scored_first = any(
                    _inside(score.node, loop, self.a.index) and self.positions.order(score.node, train.node) == -1
                    for score in scores
                )
                if scored_first or id(loop) in reported:
                    continue
                reported.add(id(loop))
                found.append(self.finding(
                    "P3", "C3", discard.node, "high",
                    f"a 'score' forward pass on validation data whose output is discarded, followed by training "
                    f"at line {_line(train.node)}: nothing is scored before the update, so any reported score "
                    f"comes from the adapted model",
                    related=train.node,
                ))
        return found

    def _adapt_then_score(self, info: FunctionInfo | None, events: FunctionEvents) -> list[Finding]:
        found: list[Finding] = []
        trains = [e for e in self._val_events(info, events, "train") if e.persistent]
        scores = self._val_events(info, events, "score")
        for train in trains:
            later = [
                score for score in scores
                if score.node is not train.node
                and not self.positions.common_loops(score.node, train.node)
                and self.positions.order(train.node, score.node) == -1
            ]
            summary = self.a.summaries.get(train.via) if train.via is not None else None
            score_first = summary is not None and summary.score_first
            if not later:
                # Nothing scores afterwards in this function. A pure adaptation (no score taken before the update)
                # is still training on validation tokens; say so where no caller will see the sequence instead.
                scored_alongside = score_first or any(self.positions.common_loops(s.node, train.node) for s in scores)
                outermost = info is None or not self.a.callers.get(info)
                pure_adapter = summary is not None and not summary.score_deps
                if not scored_alongside and (pure_adapter or (train.via is None and outermost)):
                    found.append(self.finding(
                        "P3", "C3", train.node, "medium",
                        "optimizer steps on validation tokens with no score-first accumulation before them "
                        "(no later scoring seen in this function)",
                    ))
                continue
            first_score = min(later, key=lambda e: _line(e.node))
            restored = self._restored_between(info, train.node, first_score.node)
            if restored is not None:
                found.append(self.finding(
                    "P3", "C3", train.node, "low",
                    f"optimizer steps on validation tokens whose weights are restored at line {restored} before "
                    f"scoring (tolerated warmup, flagged for review)",
                ))
                continue
            if score_first:
                baked = self._persisted_between(info, train.node, first_score.node)
                found.append(self.finding(
                    "P3", "C4", train.node, "high" if baked else "medium",
                    f"the model adapted by this score-first TTT pass is scored again at line {_line(first_score.node)}"
                    + (f" after being saved / quantized at line {baked}: only the first-pass score may be reported"
                       if baked else ": only the first-pass (score-before-update) number may be reported"),
                ))
                continue
            what = f"{train.via.name}() adapts" if train.via is not None else "optimizer steps here adapt"
            found.append(self.finding(
                "P3", "C3", train.node, "high",
                f"{what} the model on validation tokens before they are scored at line "
                f"{_line(first_score.node)} (train-then-score)",
            ))
        warmups = [e for e in self._val_events(info, events, "train") if not e.persistent and e.via is None]
        if warmups and not self._val_events(info, events, "score"):
            found.append(self.finding(
                "P3", "C3", warmups[0].node, "low",
                "optimizer steps on validation tokens for a throwaway copy / adapter whose state is discarded "
                "(tolerated warmup, flagged for review)",
            ))
        return found

    def _restored_between(self, info: FunctionInfo | None, first: ast.AST, second: ast.AST) -> int | None:
        """A ``load_state_dict(snapshot)`` between an update and a score, where ``snapshot`` was taken before the
        update: the update was a throwaway warmup. (Loading weights produced after the update, such as the
        dequantised artifact of a pre-quant TTT model, is not a restore.)"""
        nodes = self.a._nodes(info)
        taken_before = {
            name
            for node in nodes if isinstance(node, ast.Assign) and self.positions.order(node, first) == -1
            for target in node.targets for name in names_in(target)
        }
        for node in nodes:
            if not (isinstance(node, ast.Call) and call_basename(node) == "load_state_dict" and node.args):
                continue
            snapshot = node.args[0]
            if isinstance(snapshot, ast.Name) and snapshot.id in taken_before and \
                    self.positions.order(first, node) == -1 and self.positions.order(node, second) == -1:
                return node.lineno
        return None

    def _persisted_between(self, info: FunctionInfo | None, first: ast.AST, second: ast.AST) -> int | None:
        for node in self.a._nodes(info):
            if isinstance(node, ast.Call) and _PERSIST.search(call_basename(node)) and \
                    self.positions.order(first, node) == -1 and self.positions.order(node, second) == -1:
                return node.lineno
        return None

    def _prefilled_cache(self, info: FunctionInfo | None, events: FunctionEvents) -> list[Finding]:
        found: list[Finding] = []
        flow = self.a.flow_for(info)
        scores = self._val_events(info, events, "score")
        for node in self.a._nodes(info):
            if not (isinstance(node, ast.Call) and _PREFILL.match(call_basename(node)) and receiver(node) is not None):
                continue
            whole = [arg for arg in node.args if isinstance(arg, ast.Name) and VAL in flow.of(arg)
                     and self._is_whole_stream(arg.id, info)]
            if not whole or self.positions.loops(node):
                continue
            before = [s for s in scores if self.positions.order(s.node, node) == -1]
            later = [s for s in scores if self.positions.order(node, s.node) == -1]
            if before and later:
                # Pass 1 scored the stream, the state is then built from all of it, and pass 2 scores it again:
                # every rescored token reads counts that include itself and every later token.
                found.append(self.finding(
                    "P3", "C1/C4", node, "high",
                    f"state is built from the whole validation stream `{whole[0].id}` after it was scored at line "
                    f"{_line(before[0].node)} and the stream is scored again at line {_line(later[0].node)} "
                    "(two-pass rescoring: the second pass reads counts of the tokens it scores and of later ones)",
                ))
                continue
            # Medium only: a causal one-pass precompute over the whole stream (the accepted n-gram tilt hints)
            # has the same static shape as a two-pass cache prefill.
            found.append(self.finding(
                "P3", "C1/C4", node, "medium",
                f"state is built from the whole validation stream `{whole[0].id}` "
                + (f"before it is scored at line {_line(later[0].node)}" if later else "outside the scoring loop")
                + ": legal only if every position reads state built from earlier tokens (verify; two-pass "
                "prefill is C1)",
            ))
        return found

    def _is_whole_stream(self, name: str, info: FunctionInfo | None) -> bool:
        """``val_tokens`` itself, or a name bound in this function to a conversion of the whole stream
        (``tokens_np = val_tokens.numpy()``), never to a slice of it."""
        if is_val_name(name):
            return True
        values = [
            node.value for node in self.a._nodes(info)
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        ]
        return bool(values) and all(
            not any(isinstance(sub, ast.Subscript) for sub in ast.walk(value))
            and any(isinstance(sub, ast.Name) and is_val_name(sub.id) for sub in ast.walk(value))
            for value in values
        )

    def _min_over_passes(self, info: FunctionInfo | None) -> list[Finding]:
        found: list[Finding] = []
        flow = self.a.flow_for(info)
        for node in self.a._nodes(info):
            if not isinstance(node, ast.Call):
                continue
            name = call_basename(node)
            candidates: list[ast.expr] = []
            if name in {"minimum", "fmin", "min"} and len(node.args) >= 2:
                candidates = node.args[:2]
            elif name in {"min", "amin"} and node.args and isinstance(node.args[0], ast.Call) and \
                    call_basename(node.args[0]) in {"stack", "cat"} and node.args[0].args and \
                    isinstance(node.args[0].args[0], (ast.List, ast.Tuple)):
                candidates = list(node.args[0].args[0].elts)
            elif name == "where" and len(node.args) == 3 and isinstance(node.args[0], ast.Compare):
                compared = [node.args[0].left, *node.args[0].comparators]
                if {ast.dump(c) for c in compared} == {ast.dump(node.args[1]), ast.dump(node.args[2])}:
                    candidates = [node.args[1], node.args[2]]
            losses = [c for c in candidates if _per_token_loss(flow.of(c))]
            if len(losses) >= 2 and len({ast.dump(c) for c in losses}) >= 2:
                found.append(self.finding(
                    "P3", "C4", node, "high",
                    "element-wise minimum of per-token losses from different passes / predictors "
                    "(oracle choice with knowledge of the target)",
                ))
        return found


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def _line(node: ast.AST) -> int:
    return getattr(node, "lineno", 0)


def _inside(node: ast.AST, container: ast.AST, index: ModuleIndex) -> bool:
    current = index.parents.get(node)
    while current is not None:
        if current is container:
            return True
        current = index.parents.get(current)
    return False


def _trains_previous_chunk(train: ast.AST, loop: ast.For | ast.While | ast.AsyncFor, index: ModuleIndex) -> bool:
    """Is the update at ``train`` made on the previous iteration's data: inside ``if ci > 0:`` or indexing
    ``ci - 1`` with the loop's counter ``ci``?"""
    target = loop.target if isinstance(loop, (ast.For, ast.AsyncFor)) else None
    if not isinstance(target, ast.Name):
        return False
    counter = target.id
    statement = train
    while index.parents.get(statement) is not None and statement not in loop.body:
        statement = index.parents[statement]
    for node in ast.walk(statement):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and isinstance(node.left, ast.Name) \
                and node.left.id == counter and isinstance(node.right, ast.Constant) and node.right.value == 1:
            return True
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == counter \
                and isinstance(node.ops[0], (ast.Gt, ast.GtE, ast.NotEq)) \
                and isinstance(node.comparators[0], ast.Constant) and node.comparators[0].value in (0, 1):
            return True
    return False


def _train_source(train: ast.AST, nodes: list[ast.AST]) -> ast.AST | None:
    """The loss whose backward pass feeds the update at ``train``: the nearest ``x.backward()`` before it."""
    backwards = [node for node in nodes if isinstance(node, ast.Call) and call_basename(node) == "backward"
                 and receiver(node) is not None and _line(node) <= _line(train)]
    if not backwards:
        return None
    return receiver(max(backwards, key=_line))


def _slices_feeding(node: ast.AST | None, definitions: dict[str, list[ast.expr]], depth: int = 0) -> list[ast.Slice]:
    """The position slices (``a[:s]``, ``y[s:wlen]``) an expression selects, through the names it is computed
    from. A sliced array is not followed further: its own history (``x = chunk[:-1]``) says which stream it came
    from, not which positions this expression reads."""
    if node is None or depth > 4:
        return []
    found: list[ast.Slice] = []
    pending: list[ast.AST] = [node]
    while pending:
        sub = pending.pop()
        if isinstance(sub, ast.Subscript):
            index = sub.slice.elts[-1] if isinstance(sub.slice, ast.Tuple) and sub.slice.elts else sub.slice
            if isinstance(index, ast.Slice) and (index.lower is not None or index.upper is not None):
                found.append(index)
                continue
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
            for value in definitions.get(sub.id, [])[:3]:
                if value is not node:
                    found += _slices_feeding(value, definitions, depth + 1)
            continue
        pending.extend(ast.iter_child_nodes(sub))
    return found


def _is_no_grad(block: ast.With | ast.AsyncWith) -> bool:
    for item in block.items:
        expr = item.context_expr
        if isinstance(expr, ast.Call) and call_basename(expr) in {"inference_mode", "no_grad"}:
            return True
    return False


def _mentions_grad(node: ast.AST) -> bool:
    return any(isinstance(sub, ast.Attribute) and sub.attr == "grad" for sub in ast.walk(node))


def _mentions_report(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and _REPORT.search(sub.value):
            return True
    return False


def _backward_source(call: ast.Call) -> ast.expr:
    recv = receiver(call)
    if call_basename(call) == "backward" and recv is not None:
        return recv
    return call.args[0] if call.args else call


def _is_epoch_loop(loop: ast.For | ast.While | ast.AsyncFor) -> bool:
    if not isinstance(loop, (ast.For, ast.AsyncFor)):
        return False
    target = loop.target.id if isinstance(loop.target, ast.Name) else ""
    return bool(_EPOCH_VAR.fullmatch(target.lower())) or bool(_EPOCH_ITER.search(ast.unparse(loop.iter)))


def _per_token_loss(labels: Labels) -> bool:
    return TOK in labels and bool(labels & {LOSS, GOLDLP})


