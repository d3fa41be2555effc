"""Label-based data-flow analysis of a training script, computed from its AST alone.

Every expression gets a set of *labels* describing what it is derived from: validation tokens, target token ids,
the model's probability of the gold token, a hash key that contains the target, a loss, and so on. Labels are
propagated flow-sensitively through each function (assignments overwrite, branches join, loops iterate to a fixed
point) and across calls: a function's parameters carry ``param:NAME`` placeholders that are replaced by the
caller's argument labels when the function's results are used at a call site. The pattern detectors in
``scan_rules`` only ever ask questions of the form "what are the labels of this node at this point?".

The analysis is deliberately conservative about names: labels come from data flow first and from naming
conventions of the upstream scripts (``val_tokens``, ``y_batch``, ``tgt``) second, and a label only matters to a
detector when it meets the specific shape that detector looks for.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------

VAL = "val"  # derived from validation tokens (or the validation shard files)
TGT = "tgt"  # a target token id (the token being predicted)
HKEY = "hkey"  # a hash key with a target token mixed in (XOR / multiply-by-prime)
NGOLD = "ngold"  # a value read from a table through a target-containing hash key
GOLD = "gold"  # a value read at the target index of some array
GOLDP = "goldp"  # the model's probability of the gold token only
GOLDLP = "goldlp"  # the model's log-probability / NLL of the gold token
PROB = "prob"  # a full probability vector (softmax output)
LOGP = "logp"  # a full log-probability vector
LOSS = "loss"  # a loss / NLL value
TOK = "tok"  # per-token (not yet reduced) values
MIXED = "mixed"  # the gold probability blended with another quantity
LOCAL = "local"  # a throwaway object made inside the function (LoRA, deep copy, fresh delta tensor)
OPTIM = "optim"  # an optimizer
SPREAD = "spread"  # a token's gold log-probability divided by its byte length: a per-byte share of it
STAT = "stat"  # a per-position statistic of a full distribution (its entropy, its max): no token's probability
PARAM = "param:"  # prefix: depends on the function parameter of that name

GOLD_FAMILY = frozenset({GOLD, GOLDP, GOLDLP})
# Labels a callee parameter inherits from its call sites (the content of a value, never its provenance).
SEEDABLE = frozenset({TGT, HKEY, NGOLD, GOLD, GOLDP, GOLDLP, PROB, LOGP, MIXED, STAT, SPREAD})
# Labels that describe a value's shape, not what it carries; a value with only these is as good as a constant.
SHAPE_ONLY = frozenset({TOK})

Labels = frozenset[str]
EMPTY: Labels = frozenset()


def param_label(name: str) -> str:
    return PARAM + name


def params_in(labels: Iterable[str]) -> set[str]:
    return {label[len(PARAM):] for label in labels if label.startswith(PARAM)}


# ----------------------------------------------------------------------------------------------------------------
# Naming conventions of the upstream scripts
# ----------------------------------------------------------------------------------------------------------------

_VAL_NAME = re.compile(
    r"(val|valid|validation|eval)_?(tokens?|toks?|ids|data|np|arr|array|stream|seqs?|files?|pattern|paths?|glob|"
    r"shards?|loader|set|split|buf)(_\w+)?"
)
_SIZE_SUFFIX = re.compile(r"(len|size|count|every|stride|bytes|batch|steps?|num|n|seqs)$")
_TARGET_NAME = re.compile(
    r"(y|ys|yb|yy|y_?(batch|b|np|t|all|true|ids?|seq|chunk|flat|toks?|tokens?|local|gpu|cpu|i|j|s)"
    r"|tgt|tgts|tgt_\w+|\w+_tgts?|targets?|targets?_\w+|\w+_targets?|labels?|labels?_\w+|\w+_labels?"
    r"|(next|true|gold)_?(tok|token|id)s?(_\w+)?)"
)
_VAL_STRING = re.compile(r"fineweb_val|(^|[/_*])val(idation)?_[^/\s]*\.bin|\bval_\*")
_PRIME_NAME = re.compile(r"prime|mult|hash_?(mul|coef|p)", re.IGNORECASE)
_LOCAL_CLASS = re.compile(r"lora|adapter|delta", re.IGNORECASE)
_OPTIMIZER_CTOR = re.compile(
    r"^(SGD|ASGD|Adam|AdamW|Adamax|NAdam|RAdam|Adagrad|Adadelta|RMSprop|Rprop|LBFGS|Lion|SparseAdam|"
    r"\w*Muon\w*|\w*Optimizer\w*|Optimizers)$"
)
_VAL_LOADER_FUNC = re.compile(r"load_val|validation_tokens|load_eval_tokens|val_tokens", re.IGNORECASE)


def is_val_name(name: str) -> bool:
    match = _VAL_NAME.fullmatch(name.lower().lstrip("_"))
    return bool(match) and not _SIZE_SUFFIX.search(match.group(3) or "")


def is_target_name(name: str) -> bool:
    return bool(_TARGET_NAME.fullmatch(name.lower().lstrip("_")))


def is_val_string(value: str) -> bool:
    return bool(_VAL_STRING.search(value))


def name_labels(name: str) -> Labels:
    labels = set()
    if is_val_name(name):
        labels.add(VAL)
    if is_target_name(name):
        labels.add(TGT)
    return frozenset(labels)


# ----------------------------------------------------------------------------------------------------------------
# Small AST helpers
# ----------------------------------------------------------------------------------------------------------------


def dotted_name(node: ast.AST) -> str:
    """``torch.nn.functional.cross_entropy`` for an attribute chain, ``""`` when its root is not a plain name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    parts.append(node.id)
    return ".".join(reversed(parts))


def call_basename(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def receiver(call: ast.Call) -> ast.expr | None:
    return call.func.value if isinstance(call.func, ast.Attribute) else None


def root_name(node: ast.AST) -> str | None:
    """The variable an attribute / subscript chain hangs off (``a`` for ``a.b[c].d``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
        node = node.value
    if isinstance(node, ast.Call):
        return root_name(node.func.value) if isinstance(node.func, ast.Attribute) else None
    return node.id if isinstance(node, ast.Name) else None


def names_in(node: ast.AST) -> set[str]:
    return {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)}


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def is_int_constant(node: ast.AST, minimum: int = 0) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool) \
        and node.value >= minimum


def statement_children(stmt: ast.stmt) -> Iterator[list[ast.stmt]]:
    """The statement blocks nested directly in ``stmt`` (bodies of if/for/while/with/try/match)."""
    for attr in ("body", "orelse", "finalbody"):
        block = getattr(stmt, attr, None)
        if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
            yield block
    for handler in getattr(stmt, "handlers", []) or []:
        yield handler.body
    for case in getattr(stmt, "cases", []) or []:
        yield case.body


def top_level_code(tree: ast.Module, *, with_classes: bool) -> list[ast.stmt]:
    """The module's own statements (imports, constants, ``if __name__ == "__main__":``), without function
    definitions and, unless asked for, without class definitions."""
    skipped = (ast.FunctionDef, ast.AsyncFunctionDef) if with_classes else (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                            ast.ClassDef)
    return [stmt for stmt in tree.body if not isinstance(stmt, skipped)]


def assigned_names(stmt: ast.Assign | ast.AnnAssign) -> list[str]:
    """Names and attribute names bound by an assignment (``x = ...`` gives x, ``args.x = ...`` gives x)."""
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    return [t.id if isinstance(t, ast.Name) else t.attr for t in targets if isinstance(t, (ast.Name, ast.Attribute))]


def walk_local(node: ast.AST) -> Iterator[ast.AST]:
    """``ast.walk`` that does not descend into nested function / class / lambda bodies."""
    pending = [node]
    while pending:
        current = pending.pop()
        yield current
        for child in ast.iter_child_nodes(current):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            pending.append(child)


# ----------------------------------------------------------------------------------------------------------------
# Module index: functions, classes, parents
# ----------------------------------------------------------------------------------------------------------------

FuncNode = ast.FunctionDef | ast.AsyncFunctionDef

# Method names that are too generic to resolve to "the" module method of that name.
_UNRESOLVED_METHODS = frozenset({
    "forward", "__call__", "__init__", "step", "zero_grad", "backward", "train", "eval", "to", "cuda", "cpu",
    "float", "half", "bfloat16", "add", "append", "extend", "update", "get", "items", "keys", "values", "reset",
    "item", "numpy", "clone", "copy", "sum", "mean", "view", "reshape", "load_state_dict", "state_dict", "apply",
    "parameters", "named_parameters", "modules", "register_forward_hook", "remove", "run", "close", "write",
})


@dataclass(eq=False)  # identity semantics: used as a dict key
class FunctionInfo:
    node: FuncNode
    qualname: str
    class_name: str | None
    parent: FunctionInfo | None  # enclosing function, for closures

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def params(self) -> list[str]:
        args = self.node.args
        names = [a.arg for a in [*args.posonlyargs, *args.args]]
        if self.class_name is not None and names and names[0] in {"self", "cls"}:
            names = names[1:]
        return names

    @property
    def all_params(self) -> list[str]:
        args = self.node.args
        names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
        if args.vararg:
            names.append(args.vararg.arg)
        if args.kwarg:
            names.append(args.kwarg.arg)
        if self.class_name is not None and names and names[0] in {"self", "cls"}:
            names = names[1:]
        return names


class ModuleIndex:
    """Functions, classes and parent links of one parsed source file."""

    def __init__(self, tree: ast.Module, source: str) -> None:
        self.tree = tree
        self.source = source
        self.lines = source.splitlines()
        self.parents: dict[ast.AST, ast.AST] = {}
        self.nodes: list[ast.AST] = list(ast.walk(tree))  # every node, walked once for all the rules
        for node in self.nodes:
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self._local_nodes: dict[int, tuple[list[ast.stmt], list[ast.AST]]] = {}
        self.functions: list[FunctionInfo] = []
        self.by_node: dict[ast.AST, FunctionInfo] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        self._collect(tree.body, None, None, "")
        self.module_funcs: dict[str, FunctionInfo] = {
            info.name: info for info in self.functions if info.parent is None and info.class_name is None
        }
        methods: dict[str, list[FunctionInfo]] = {}
        for info in self.functions:
            if info.class_name is not None and info.parent is None:
                methods.setdefault(info.name, []).append(info)
        self.unique_methods = {
            name: infos[0] for name, infos in methods.items() if len(infos) == 1 and name not in _UNRESOLVED_METHODS
        }

    def _collect(self, body: list[ast.stmt], parent: FunctionInfo | None, class_name: str | None, prefix: str) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                info = FunctionInfo(stmt, prefix + stmt.name, class_name, parent)
                self.functions.append(info)
                self.by_node[stmt] = info
                self._collect(stmt.body, info, None, info.qualname + ".")
            elif isinstance(stmt, ast.ClassDef):
                if parent is None:
                    self.classes.setdefault(stmt.name, stmt)
                self._collect(stmt.body, parent, stmt.name, prefix + stmt.name + ".")
            else:
                for block in statement_children(stmt):
                    self._collect(block, parent, class_name, prefix)

    def local_nodes(self, body: list[ast.stmt]) -> list[ast.AST]:
        """Every node of ``body`` outside nested functions / classes / lambdas, computed once per body: the flow
        and order analyses iterate to a fixed point and would otherwise re-walk every function each round."""
        cached = self._local_nodes.get(id(body))
        if cached is None or cached[0] is not body:
            # The body is stored with its nodes so that its id cannot be reused by another list.
            cached = (body, [node for stmt in body for node in walk_local(stmt)])
            self._local_nodes[id(body)] = cached
        return cached[1]

    def line(self, lineno: int) -> str:
        return self.lines[lineno - 1].strip() if 0 < lineno <= len(self.lines) else ""

    def enclosing_function(self, node: ast.AST) -> FunctionInfo | None:
        current = self.parents.get(node)
        while current is not None:
            if current in self.by_node:
                return self.by_node[current]
            current = self.parents.get(current)
        return None

    def nested_in(self, info: FunctionInfo) -> dict[str, FunctionInfo]:
        """Functions visible by bare name from inside ``info`` (its own nested defs and its ancestors')."""
        visible: dict[str, FunctionInfo] = {}
        scope: FunctionInfo | None = info
        chain = []
        while scope is not None:
            chain.append(scope)
            scope = scope.parent
        for ancestor in reversed(chain):
            for candidate in self.functions:
                if candidate.parent is ancestor and candidate.class_name is None:
                    visible[candidate.name] = candidate
        return visible

    def resolve_call(self, call: ast.Call, caller: FunctionInfo | None) -> FunctionInfo | None:
        func = call.func
        if isinstance(func, ast.Name):
            if caller is not None:
                local = self.nested_in(caller).get(func.id)
                if local is not None:
                    return local
            return self.module_funcs.get(func.id)
        if isinstance(func, ast.Attribute):
            return self.unique_methods.get(func.attr)
        return None


def bind_arguments(call: ast.Call, callee: FunctionInfo, skip: int = 0) -> dict[str, ast.expr]:
    """Map callee parameter names to the argument expressions of ``call`` (positional after ``skip`` args)."""
    bound: dict[str, ast.expr] = {}
    params = callee.params
    positional = [arg for arg in call.args[skip:] if not isinstance(arg, ast.Starred)]
    for name, arg in zip(params, positional, strict=False):
        bound[name] = arg
    for kw in call.keywords:
        if kw.arg is not None and kw.arg in callee.all_params:
            bound[kw.arg] = kw.value
    return bound


# ----------------------------------------------------------------------------------------------------------------
# Function summaries shared between functions
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What callers need to know about a function: the labels of its results, in terms of its parameters."""

    return_labels: Labels = EMPTY
    # Labels a parameter receives from call sites (content labels only; see SEEDABLE).
    seeds: dict[str, Labels] = field(default_factory=dict)

    def key(self) -> tuple[Labels, tuple[tuple[str, Labels], ...]]:
        return self.return_labels, tuple(sorted(self.seeds.items()))


# ----------------------------------------------------------------------------------------------------------------
# The per-function interpreter
# ----------------------------------------------------------------------------------------------------------------

Env = dict[str, Labels]
MAX_LOOP_ROUNDS = 4

_PASS_THROUGH_METHODS = frozenset({
    "to", "long", "int", "float", "double", "half", "bfloat16", "cpu", "cuda", "numpy", "astype", "contiguous",
    "clone", "detach", "reshape", "view", "view_as", "flatten", "squeeze", "unsqueeze", "permute", "transpose",
    "expand", "expand_as", "T", "copy", "tolist", "type", "pin_memory", "repeat", "roll", "narrow", "split",
    "chunk", "unbind", "clamp", "clamp_min", "clamp_max", "clip", "abs", "neg", "flip",
})
_REDUCTIONS = frozenset({"sum", "mean", "item", "nansum", "nanmean", "prod", "norm", "max", "min", "amax", "amin"})
_NO_RESULT = frozenset({
    "print", "log0", "info", "debug", "warning", "logger", "write", "flush", "barrier", "all_reduce",
    "broadcast", "synchronize", "zero_grad", "backward", "step", "append", "extend", "requires_grad_",
    "manual_seed", "seed", "isinstance", "len", "range", "enumerate", "zip", "hasattr", "getattr", "set_device",
})
_CONSTRUCTORS = frozenset({
    "zeros", "zeros_like", "ones", "ones_like", "empty", "empty_like", "full", "full_like", "randn", "rand",
    "randint", "randn_like", "rand_like", "arange", "linspace", "eye", "tensor_zeros",
})
_LOG = frozenset({"log", "log2", "log10", "log1p"})
_MUTATORS = frozenset({
    "append", "extend", "insert", "appendleft", "add_", "copy_", "update", "index_add_", "scatter_add_",
    "index_put_", "put_", "setdefault",
})
# Methods of containers and tables that take (key, value) arguments: never a model forward pass.
_CONTAINER_METHODS = frozenset({
    "add", "append", "update", "put", "insert", "index_put_", "scatter_add_", "scatter_", "index_add_", "copy_",
    "masked_fill", "masked_fill_", "where", "eq", "ne", "setdefault", "get", "query", "lookup", "push",
})
_EXP = frozenset({"exp", "exp2", "expm1"})


class FunctionFlow:
    """Labels of every expression of one function (or of the module's top-level code)."""

    def __init__(
        self,
        index: ModuleIndex,
        info: FunctionInfo | None,
        body: list[ast.stmt],
        summaries: dict[FunctionInfo, Summary],
        attr_env: dict[str, Labels],
        closure_env: Env | None = None,
    ) -> None:
        self.index = index
        self.info = info
        self.body = body
        self.summaries = summaries
        self.attr_env = attr_env
        self.closure_env = closure_env or {}
        self.labels: dict[ast.AST, Labels] = {}
        self.return_labels: set[str] = set()
        self.final_env: Env = {}
        self.mix_sites: list[ast.AST] = []
        self.hkey_reads: list[ast.Subscript | ast.Call] = []
        self.log_args: list[ast.expr] = []
        # Parameter seeds this function hands to its callees: callee -> param -> labels.
        self.callee_seeds: dict[FunctionInfo, dict[str, set[str]]] = {}
        self._target_index = self._target_index_pairs()
        self._update_pairs = self._subscript_updates()

    # -- entry point -------------------------------------------------------------------------------------------

    def run(self) -> FunctionFlow:
        env: Env = dict(self.closure_env)
        if self.info is not None:
            summary = self.summaries.get(self.info, Summary())
            for name in self.info.all_params:
                env[name] = frozenset({param_label(name)}) | name_labels(name) | summary.seeds.get(name, EMPTY)
        env = self.block(self.body, env)
        self.final_env = env
        return self

    # -- statements --------------------------------------------------------------------------------------------

    def block(self, stmts: list[ast.stmt], env: Env) -> Env:
        for stmt in stmts:
            env = self.statement(stmt, env)
        return env

    def statement(self, stmt: ast.stmt, env: Env) -> Env:
        if isinstance(stmt, ast.Assign):
            value = self.expr(stmt.value, env)
            for target in stmt.targets:
                env = self.assign(target, value, stmt.value, env)
            return env
        if isinstance(stmt, ast.AnnAssign):
            if stmt.value is None:
                return env
            return self.assign(stmt.target, self.expr(stmt.value, env), stmt.value, env)
        if isinstance(stmt, ast.AugAssign):
            current = self.expr(_as_load(stmt.target), env)
            value = self.expr(stmt.value, env)
            combined = self.binop_labels(stmt.op, current, value, stmt, stmt.target, stmt.value)
            return self.assign(stmt.target, combined, stmt.value, env, weak=True)
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            iterated = self.expr(stmt.iter, env)
            return self.loop(stmt, env, lambda e: self.assign(stmt.target, iterated, stmt.iter, e))
        if isinstance(stmt, ast.While):
            self.expr(stmt.test, env)
            return self.loop(stmt, env, lambda e: e)
        if isinstance(stmt, ast.If):
            self.expr(stmt.test, env)
            taken = self.block(stmt.body, dict(env))
            skipped = self.block(stmt.orelse, dict(env))
            return join(taken, skipped)
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                value = self.expr(item.context_expr, env)
                if item.optional_vars is not None:
                    env = self.assign(item.optional_vars, value, item.context_expr, env)
            return self.block(stmt.body, env)
        if isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            after_body = self.block(stmt.body, dict(env))  # type: ignore[attr-defined]
            merged = join(env, after_body)
            for handler in stmt.handlers:  # type: ignore[attr-defined]
                merged = join(merged, self.block(handler.body, dict(merged)))
            merged = join(merged, self.block(stmt.orelse, dict(after_body)))  # type: ignore[attr-defined]
            return self.block(stmt.finalbody, merged)  # type: ignore[attr-defined]
        if isinstance(stmt, ast.Match):
            subject = self.expr(stmt.subject, env)
            merged = dict(env)
            for case in stmt.cases:
                case_env = dict(env)
                for sub in ast.walk(case.pattern):
                    if isinstance(sub, (ast.MatchAs, ast.MatchStar)) and sub.name:
                        case_env[sub.name] = subject
                merged = join(merged, self.block(case.body, case_env))
            return merged
        if isinstance(stmt, ast.Return):
            if stmt.value is not None:
                self.return_labels |= self.expr(stmt.value, env)
            return env
        if isinstance(stmt, ast.Expr):
            self.expr(stmt.value, env)
            return env
        if isinstance(stmt, (ast.Raise, ast.Assert, ast.Delete)):
            for child in ast.iter_child_nodes(stmt):
                if isinstance(child, ast.expr):
                    self.expr(child, env)
            return env
        if isinstance(stmt, ast.ClassDef):
            # Class bodies at module level hold configuration (class Hyperparameters: train_files = ...).
            class_env = dict(env)
            for sub in stmt.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                class_env = self.statement(sub, class_env)
                bound = assigned_names(sub) if isinstance(sub, (ast.Assign, ast.AnnAssign)) else []
                for target in bound:
                    if target in class_env:
                        self._record_attr(target, class_env[target])
            return env
        return env

    def loop(self, stmt: ast.For | ast.AsyncFor | ast.While, env: Env, bind) -> Env:
        start = dict(env)
        current = dict(env)
        for _ in range(MAX_LOOP_ROUNDS):
            out = self.block(stmt.body, bind(dict(current)))
            merged = join(start, out)
            if merged == current:
                break
            current = merged
        return self.block(stmt.orelse, current)

    def assign(self, target: ast.expr, value: Labels, value_node: ast.expr, env: Env, weak: bool = False) -> Env:
        env = dict(env)
        if isinstance(target, ast.Name):
            labels = value | name_labels(target.id)
            env[target.id] = (env.get(target.id, EMPTY) | labels) if weak else labels
        elif isinstance(target, (ast.Tuple, ast.List)):
            elements = target.elts
            if isinstance(value_node, (ast.Tuple, ast.List)) and len(value_node.elts) == len(elements):
                for element, part in zip(elements, value_node.elts, strict=True):
                    env = self.assign(element, self.labels.get(part, EMPTY), part, env, weak)
            else:
                # Unpacking an opaque value: every element may be any part of it, except that a hash key must
                # be traced to the line that built it, so the key label does not spread through containers.
                for element in elements:
                    env = self.assign(element, value - {HKEY}, value_node, env, weak)
        elif isinstance(target, ast.Starred):
            env = self.assign(target.value, value, value_node, env, weak)
        elif isinstance(target, (ast.Subscript, ast.Attribute)):
            self.expr(_as_load(target), env)
            base = root_name(target)
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                self._record_attr(target.attr, value)
            if base is not None and not (isinstance(target, ast.Attribute) and base in {"self", "cls"}):
                env[base] = env.get(base, EMPTY) | value
        return env

    def _record_attr(self, attr: str, value: Labels) -> None:
        content = frozenset(label for label in value if not label.startswith(PARAM)) - {LOCAL, OPTIM}
        if content:
            self.attr_env[attr] = self.attr_env.get(attr, EMPTY) | content

    # -- expressions -------------------------------------------------------------------------------------------

    def expr(self, node: ast.expr | None, env: Env) -> Labels:
        if node is None:
            return EMPTY
        labels = self._expr(node, env)
        previous = self.labels.get(node)
        self.labels[node] = labels if previous is None else previous | labels
        return labels

    def _expr(self, node: ast.expr, env: Env) -> Labels:
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            return name_labels(node.id)
        if isinstance(node, ast.Constant):
            return frozenset({VAL}) if isinstance(node.value, str) and is_val_string(node.value) else EMPTY
        if isinstance(node, ast.Attribute):
            base = self.expr(node.value, env)
            if node.attr in {"shape", "dtype", "device", "ndim", "size", "grad_fn", "requires_grad"}:
                return EMPTY
            return base | name_labels(node.attr) | self.attr_env.get(node.attr, EMPTY)
        if isinstance(node, ast.Subscript):
            return self.subscript(node, env)
        if isinstance(node, ast.BinOp):
            left = self.expr(node.left, env)
            right = self.expr(node.right, env)
            return self.binop_labels(node.op, left, right, node, node.left, node.right)
        if isinstance(node, ast.UnaryOp):
            return self.expr(node.operand, env)
        if isinstance(node, ast.BoolOp):
            return union(self.expr(value, env) for value in node.values)
        if isinstance(node, ast.Compare):
            return union([self.expr(node.left, env), *(self.expr(c, env) for c in node.comparators)]) - {TOK}
        if isinstance(node, ast.IfExp):
            self.expr(node.test, env)
            return self.expr(node.body, env) | self.expr(node.orelse, env)
        if isinstance(node, ast.Call):
            return self.call(node, env)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return union(self.expr(element, env) for element in node.elts)
        if isinstance(node, ast.Dict):
            for key in node.keys:
                self.expr(key, env)
            return union(self.expr(value, env) for value in node.values)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
            inner = self.comprehension(node.generators, env)
            return self.expr(node.elt, inner)
        if isinstance(node, ast.DictComp):
            inner = self.comprehension(node.generators, env)
            self.expr(node.key, inner)
            return self.expr(node.value, inner)
        if isinstance(node, ast.NamedExpr):
            value = self.expr(node.value, env)
            env.update(self.assign(node.target, value, node.value, env))
            return value
        if isinstance(node, ast.Starred):
            return self.expr(node.value, env)
        if isinstance(node, (ast.Await, ast.Yield, ast.YieldFrom)):
            return self.expr(node.value, env) if node.value is not None else EMPTY
        if isinstance(node, ast.Slice):
            return union(self.expr(part, env) for part in (node.lower, node.upper, node.step) if part is not None)
        if isinstance(node, ast.JoinedStr):
            for value in node.values:
                if isinstance(value, ast.FormattedValue):
                    self.expr(value.value, env)
            return EMPTY
        return EMPTY

    def comprehension(self, generators: list[ast.comprehension], env: Env) -> Env:
        inner = dict(env)
        for generator in generators:
            iterated = self.expr(generator.iter, inner)
            inner = self.assign(generator.target, iterated, generator.iter, inner)
            for condition in generator.ifs:
                self.expr(condition, inner)
        return inner

    def subscript(self, node: ast.Subscript, env: Env) -> Labels:
        base = self.expr(node.value, env)
        index = self.expr(node.slice, env)
        labels = set(base)
        if VAL in base and _is_shifted_slice(node.slice):
            labels.add(TGT)  # chunk[1:] of a token stream is the sequence of targets
        if self._is_target_position(node):
            labels.add(TGT)
        if HKEY in index:
            labels.add(NGOLD)
            if not self._is_update_read(node):
                self.hkey_reads.append(node)
        elif TGT in index and not _is_slice_index(node.slice):
            labels |= _gold_of(base)
            labels.discard(TGT)
        return frozenset(labels)

    def binop_labels(
        self, op: ast.operator, left: Labels, right: Labels, node: ast.AST, left_node: ast.AST, right_node: ast.AST
    ) -> Labels:
        labels = set(left | right)
        if TGT in left or TGT in right:
            if isinstance(op, (ast.BitXor, ast.LShift, ast.RShift)):
                labels.add(HKEY)
            elif isinstance(op, ast.Mult) and (
                (TGT in left and _is_hash_multiplier(right_node)) or (TGT in right and _is_hash_multiplier(left_node))
            ):
                labels.add(HKEY)
            elif isinstance(op, (ast.Add, ast.BitOr)) and (
                (TGT in right and TGT not in left and self._rolling_hash_step(node, left_node))
                or (TGT in left and TGT not in right and self._rolling_hash_step(node, right_node))
            ):
                labels.add(HKEY)
        if isinstance(op, ast.Div) and GOLDLP in left and GOLD in right and not right & {GOLDLP, GOLDP, LOSS}:
            labels.add(SPREAD)  # log p(token) / bytes(token): the token's probability spread over its bytes
        if isinstance(op, (ast.Add, ast.Sub)) and (
            _mixes_gold(left, right) or _mixes_gold(right, left) or _mixes_spread(left, right)
            or _mixes_spread(right, left)
        ):
            labels.add(MIXED)
            self.mix_sites.append(node)
        return frozenset(labels)

    def _rolling_hash_step(self, node: ast.AST, scaled: ast.AST) -> bool:
        """``h * P + tgt`` (or ``(h << k) | tgt``): one step of a polynomial / rolling hash that folds the target
        into a context hash. It is a hash key when the multiplier is a hash constant or the sum is then reduced
        into a table (``& MASK``, ``% size``); a plain ``row * V + col`` index is neither."""
        if not (isinstance(scaled, ast.BinOp) and isinstance(scaled.op, (ast.Mult, ast.LShift))):
            return False
        if _is_hash_multiplier(scaled.left) or _is_hash_multiplier(scaled.right):
            return True
        parent = self.index.parents.get(node)
        return isinstance(parent, ast.BinOp) and isinstance(parent.op, (ast.BitAnd, ast.Mod)) and parent.left is node

    def call(self, node: ast.Call, env: Env) -> Labels:
        name = call_basename(node)
        recv = receiver(node)
        on_value = recv is not None and not _is_module_path(recv, self.index)  # x.f(...), not torch.f(...)
        recv_labels = self.expr(recv, env) if recv is not None else EMPTY
        arg_labels = [self.expr(arg, env) for arg in node.args]
        kw_labels = {kw.arg: self.expr(kw.value, env) for kw in node.keywords}
        passed = union([*arg_labels, *kw_labels.values()])
        operand = recv_labels if on_value else (arg_labels[0] if arg_labels else EMPTY)

        if on_value and name in _MUTATORS:
            # lst.append(v), acc.add_(v), table.index_add_(0, k, v): the container now holds v's labels.
            base = root_name(recv)  # type: ignore[arg-type]
            if base is not None and base not in {"self", "cls"}:
                env[base] = env.get(base, EMPTY) | passed
        if name.lower() in _LOG:
            log_operand = recv if on_value else (node.args[0] if node.args else None)
            if log_operand is not None:
                self.log_args.append(log_operand)
            return _exp_log(operand, is_log=True)
        if name.lower() in _EXP:
            return _exp_log(operand, is_log=False)

        callee = self.index.resolve_call(node, self.info) if recv is None or on_value else None
        if callee is not None:
            return self._module_call(node, callee, recv_labels if on_value else EMPTY)
        if isinstance(node.func, ast.Name) and node.func.id in self.index.classes:
            # An object of a class defined in the script: a throwaway adapter, or a holder of its arguments
            # (a loader built on the validation files stays "val").
            return frozenset({LOCAL}) if _LOCAL_CLASS.search(node.func.id) else passed - {TGT, HKEY, TOK}
        if name in {"cross_entropy", "nll_loss"}:
            return self._cross_entropy(node, passed)
        if name == "softmax":
            return (operand - GOLD_FAMILY - {TGT}) | {PROB}
        if name == "log_softmax":
            return (operand - GOLD_FAMILY - {TGT}) | {LOGP}
        if name in {"gather", "take_along_dim", "take_along_axis", "take", "index_select"}:
            return self._gather(node, recv_labels, arg_labels, kw_labels, on_value)
        if name in {"stack", "cat", "concatenate", "hstack", "vstack", "column_stack"}:
            return self._stacked(node, arg_labels)
        if name in {"logaddexp", "logsumexp"}:
            return self._log_domain_mix(node, arg_labels, passed)
        if name == "deepcopy":
            return frozenset({LOCAL})
        if _OPTIMIZER_CTOR.match(name) and not on_value:
            # Whether its parameters are a throwaway (LOCAL) or belong to a caller's model (param:...). Only the
            # parameter argument says so: hyperparameters (lr=h.lr) come from a config, not from a model.
            params = arg_labels[0] if arg_labels else kw_labels.get("params", EMPTY)
            listed = _listed(node.args[0]) if node.args else []
            if listed and all(LOCAL in self.labels.get(element, EMPTY) for element in listed):
                params = frozenset({LOCAL})  # SGD([delta, bias]): tensors made here, whatever their bounds came from
            return frozenset({OPTIM, *(label for label in params if label == LOCAL or label.startswith(PARAM))})
        if name in _CONSTRUCTORS:
            grad = keyword(node, "requires_grad")
            return frozenset({LOCAL}) if isinstance(grad, ast.Constant) and grad.value is True else EMPTY
        if name == "requires_grad_" and on_value:
            return recv_labels if params_in(recv_labels) else recv_labels | {LOCAL}
        if name.lower() in _NO_RESULT:
            return EMPTY
        if _VAL_LOADER_FUNC.search(name) and not on_value:
            return passed | {VAL}
        if on_value and name in _REDUCTIONS:
            reduced = (recv_labels - {TOK}) | (passed - {TGT})
            if recv_labels & {PROB, LOGP} and not recv_labels & GOLD_FAMILY:
                reduced |= {STAT}  # (p * log p).sum(-1): a number per position, not a distribution over tokens
            return reduced
        if on_value and name in _PASS_THROUGH_METHODS:
            return recv_labels | (passed - {TGT, HKEY})
        if on_value and name in {"parameters", "named_parameters"}:
            if LOCAL in recv_labels:
                # The parameters of an adapter made here are its own, whatever config or model it was built from.
                return frozenset({LOCAL})
            return recv_labels - {TGT, HKEY, TOK}
        return self._generic_call(node, recv_labels, arg_labels, kw_labels)

    def _cross_entropy(self, node: ast.Call, passed: Labels) -> Labels:
        labels = {LOSS, GOLDLP} | {label for label in passed if label in {VAL, LOCAL, MIXED} or label.startswith(PARAM)}
        reduction = keyword(node, "reduction")
        if isinstance(reduction, ast.Constant) and reduction.value == "none":
            labels.add(TOK)
        return frozenset(labels)

    def _stacked(self, node: ast.Call, arg_labels: list[Labels]) -> Labels:
        """torch.stack / cat of parts; a gold probability stacked with another estimate is a mixture in waiting."""
        elements = _listed(node.args[0]) if node.args else []
        parts = [self.labels.get(element, EMPTY) for element in elements]
        labels = union(parts) if elements else (arg_labels[0] if arg_labels else EMPTY)
        gold_only = any(GOLDP in part for part in parts) and any(_is_other_probability(part) for part in parts)
        # Experts stacked for a mixer: per-token gold (log-)probabilities next to a statistic of the model's
        # distribution (an entropy "expert") that is no probability of the token at all.
        statistic_expert = any(part & GOLD_FAMILY for part in parts) and any(
            STAT in part and not part & GOLD_FAMILY for part in parts)
        if gold_only or statistic_expert:
            self.mix_sites.append(node)
            labels |= {MIXED}
        return labels

    def _log_domain_mix(self, node: ast.Call, arg_labels: list[Labels], passed: Labels) -> Labels:
        """logaddexp(log(1-a) + logp_gold, log(a) + log q): the same gold-only blend, in log space."""
        if call_basename(node) == "logaddexp":
            parts = arg_labels
        else:
            inner = node.args[0] if node.args else None
            if isinstance(inner, ast.Call) and call_basename(inner) in {"stack", "cat"} and inner.args:
                inner = inner.args[0]
            parts = [self.labels.get(element, EMPTY) for element in (_listed(inner) if inner is not None else [])]
        labels = union([*parts, passed])
        if any(GOLDLP in part for part in parts) and any(
            (part - SHAPE_ONLY) and not (part & GOLD_FAMILY) for part in parts
        ):
            self.mix_sites.append(node)
            labels |= {MIXED}
        return labels

    def _generic_call(
        self, node: ast.Call, recv_labels: Labels, arg_labels: list[Labels], kw_labels: dict[str | None, Labels]
    ) -> Labels:
        everything = union([recv_labels, *arg_labels, *kw_labels.values()])
        passed = [*arg_labels, *kw_labels.values()]
        targets = [labels for labels in passed if TGT in labels]
        inputs = [labels for labels in passed if TGT not in labels and labels - {LOCAL}]
        # model(x, y) / base_model(x, y, lora=...) / self.model(input_ids=x, target_ids=y): a forward pass that
        # returns the loss of the targets.
        is_forward = bool(targets) and bool(inputs) and len(passed) >= 2 and (
            not isinstance(node.func, ast.Attribute)
            or (not _is_module_path(node.func, self.index) and node.func.attr not in _CONTAINER_METHODS)
        )
        if is_forward:
            return frozenset((everything - {TGT, HKEY, NGOLD} - GOLD_FAMILY) | {LOSS, GOLDLP, TOK})
        return everything

    def _module_call(self, node: ast.Call, callee: FunctionInfo, recv_labels: Labels) -> Labels:
        bound = bind_arguments(node, callee)
        seeds = self.callee_seeds.setdefault(callee, {})
        for param, arg in bound.items():
            content = {label for label in self.labels.get(arg, EMPTY) if label in SEEDABLE}
            if content:
                seeds.setdefault(param, set()).update(content)
        summary = self.summaries.get(callee)
        if summary is None:
            return union([recv_labels, *(self.labels.get(arg, EMPTY) for arg in node.args)])
        return substitute(summary.return_labels, bound, self.labels) | (recv_labels - {TGT, HKEY})

    def _gather(
        self,
        node: ast.Call,
        recv_labels: Labels,
        arg_labels: list[Labels],
        kw_labels: dict[str | None, Labels],
        is_method: bool,
    ) -> Labels:
        if is_method:
            base = recv_labels
            index = kw_labels.get("index") or (arg_labels[-1] if arg_labels else EMPTY)
        else:
            base = arg_labels[0] if arg_labels else EMPTY
            index = kw_labels.get("index") or kw_labels.get("indices") or (
                arg_labels[-1] if len(arg_labels) >= 2 else EMPTY
            )
            if call_basename(node) in {"take_along_axis", "take_along_dim", "take"} and len(arg_labels) >= 2:
                index = arg_labels[1]
        labels = set(base)
        if HKEY in index:
            labels.add(NGOLD)
            self.hkey_reads.append(node)
        elif TGT in index:
            labels |= _gold_of(base)
            labels.discard(TGT)
        return frozenset(labels)

    # -- patterns that need the whole function ---------------------------------------------------------------

    def _target_index_pairs(self) -> set[tuple[str, str]]:
        """(array, index) pairs where ``array[index]`` is the predicted token because ``array[index - k]`` is
        read too, e.g. ``val_np[jv]`` next to the context reads ``val_np[jv - w + k]``."""
        plain: dict[str, set[str]] = {}
        shifted: dict[str, set[str]] = {}
        for node in self.index.local_nodes(self.body):
            if not (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)):
                continue
            index = node.slice
            if isinstance(index, ast.Name):
                plain.setdefault(node.value.id, set()).add(index.id)
            elif isinstance(index, ast.BinOp) and isinstance(index.op, ast.Sub) and isinstance(index.left, ast.Name):
                shifted.setdefault(node.value.id, set()).add(index.left.id)
        return {(array, idx) for array, idxs in plain.items() for idx in idxs & shifted.get(array, set())}

    def _is_target_position(self, node: ast.Subscript) -> bool:
        return (
            isinstance(node.value, ast.Name)
            and isinstance(node.slice, ast.Name)
            and (node.value.id, node.slice.id) in self._target_index
        )

    def _subscript_updates(self) -> set[tuple[str, str]]:
        """``table[key]`` expressions that are also assigned in this function: reading them is a count update."""
        updates = set()
        for node in self.index.local_nodes(self.body):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign):
                targets = [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript):
                    updates.add((ast.dump(target.value), ast.dump(target.slice)))
        return updates

    def _is_update_read(self, node: ast.Subscript) -> bool:
        return (ast.dump(node.value), ast.dump(node.slice)) in self._update_pairs

    # -- queries used by the detectors -------------------------------------------------------------------------

    def of(self, node: ast.AST | None) -> Labels:
        return self.labels.get(node, EMPTY) if node is not None else EMPTY


# ----------------------------------------------------------------------------------------------------------------
# Helpers for the interpreter
# ----------------------------------------------------------------------------------------------------------------


def union(items: Iterable[Labels]) -> Labels:
    result: set[str] = set()
    for item in items:
        result |= item
    return frozenset(result)


def join(a: Env, b: Env) -> Env:
    merged = dict(a)
    for name, labels in b.items():
        merged[name] = merged.get(name, EMPTY) | labels
    return merged


def substitute(labels: Labels, bound: dict[str, ast.expr], recorded: dict[ast.AST, Labels]) -> Labels:
    """Replace ``param:NAME`` placeholders by the labels of the argument bound to NAME at a call site."""
    result: set[str] = set()
    for label in labels:
        if label.startswith(PARAM):
            arg = bound.get(label[len(PARAM):])
            if arg is not None:
                result |= recorded.get(arg, EMPTY)
        else:
            result.add(label)
    return frozenset(result)


def _as_load(target: ast.expr) -> ast.expr:
    """A load-context twin of an assignment target, so its labels can be evaluated (and recorded on the twin)."""
    clone = ast.parse(ast.unparse(target), mode="eval").body
    return ast.copy_location(clone, target)


def _listed(node: ast.expr) -> list[ast.expr]:
    return list(node.elts) if isinstance(node, (ast.List, ast.Tuple)) else []


def _is_shifted_slice(index: ast.expr) -> bool:
    """``[1:]``, ``[1:n+1]`` or ``[:, 1:]``: the slice that turns a token stream into its targets."""
    if isinstance(index, ast.Tuple) and index.elts:
        index = index.elts[-1]
    return isinstance(index, ast.Slice) and isinstance(index.lower, ast.Constant) and index.lower.value == 1


def _is_slice_index(index: ast.expr) -> bool:
    if isinstance(index, ast.Slice):
        return True
    return isinstance(index, ast.Tuple) and all(isinstance(part, ast.Slice) for part in index.elts)


def _is_hash_multiplier(node: ast.AST) -> bool:
    if is_int_constant(node, minimum=1000):
        return True
    text = ast.unparse(node) if isinstance(node, ast.expr) else ""
    return bool(_PRIME_NAME.search(text)) or bool(re.fullmatch(r"P(\[.*\])?|PRIMES?\[.*\]", text))


def _gold_of(base: Labels) -> set[str]:
    if PROB in base:
        return {GOLDP}
    if LOGP in base:
        return {GOLDLP, TOK}
    return {GOLD}


def _is_other_probability(labels: Labels) -> bool:
    content = labels - SHAPE_ONLY
    return bool(content) and not (content & GOLD_FAMILY)


def _mixes_gold(gold_side: Labels, other_side: Labels) -> bool:
    """(1-a)·p_model[target] + a·q: the gold probability added to something that is not a gold value itself
    (a hashed n-gram count counts as "something else": it is not a full-vocabulary distribution)."""
    if GOLDP not in gold_side:
        return False
    if NGOLD in other_side:
        return True
    return _is_other_probability(other_side)


def _mixes_spread(spread_side: Labels, other_side: Labels) -> bool:
    """λ·exp(log p(token) / bytes) + (1-λ)·q(byte): per-byte shares of a token's probability mixed with a byte
    model. The shares of one token are not a distribution over the next byte, so the mixture is not normalised."""
    return SPREAD in spread_side and GOLDP in spread_side and SPREAD not in other_side and \
        bool(other_side - SHAPE_ONLY)


def _exp_log(labels: Labels, is_log: bool) -> Labels:
    result = set(labels)
    if is_log:
        if GOLDP in result:
            result |= {GOLDLP, TOK}
            result.discard(GOLDP)
        if PROB in result:
            result.discard(PROB)
            result.add(LOGP)
    else:
        if GOLDLP in result:
            result.discard(GOLDLP)
            result.add(GOLDP)
        if LOGP in result:
            result.discard(LOGP)
            result.add(PROB)
    return frozenset(result)


def _is_module_path(node: ast.expr, index: ModuleIndex) -> bool:
    """True for ``torch``, ``F``, ``np``, ``math``, ``torch.nn.functional`` ... (a library, not a value)."""
    root = node
    while isinstance(root, ast.Attribute):
        root = root.value
    if not isinstance(root, ast.Name):
        return False
    return root.id in _library_roots(index)


def _library_roots(index: ModuleIndex) -> set[str]:
    cached = getattr(index, "_library_roots", None)
    if cached is None:
        cached = set()
        for node in index.nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    cached.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name[:1].islower():
                        cached.add(alias.asname or alias.name)
        index._library_roots = cached  # type: ignore[attr-defined]
    return cached


# ----------------------------------------------------------------------------------------------------------------
# Whole-module analysis
# ----------------------------------------------------------------------------------------------------------------


class ModuleFlow:
    """Runs ``FunctionFlow`` over every function until call summaries stop changing."""

    MAX_ROUNDS = 4

    def __init__(self, index: ModuleIndex) -> None:
        self.index = index
        self.summaries: dict[FunctionInfo, Summary] = {info: Summary() for info in index.functions}
        self.attr_env: dict[str, Labels] = {}
        self.flows: dict[FunctionInfo | None, FunctionFlow] = {}
        self._run()

    def _run(self) -> None:
        module_body = top_level_code(self.index.tree, with_classes=True)
        for _ in range(self.MAX_ROUNDS):
            before = {info: summary.key() for info, summary in self.summaries.items()}
            attrs_before = dict(self.attr_env)
            flows: dict[FunctionInfo | None, FunctionFlow] = {}
            flows[None] = FunctionFlow(self.index, None, module_body, self.summaries, self.attr_env).run()
            seeds: dict[FunctionInfo, dict[str, set[str]]] = {}
            for info in self.index.functions:
                # Nested functions see their parent's variables; top-level ones see module globals.
                closure = flows[info.parent if info.parent in flows else None].final_env
                flow = FunctionFlow(self.index, info, info.node.body, self.summaries, self.attr_env, closure).run()
                flows[info] = flow
            for flow in flows.values():
                for callee, params in flow.callee_seeds.items():
                    for param, labels in params.items():
                        seeds.setdefault(callee, {}).setdefault(param, set()).update(labels)
            for info, flow in flows.items():
                if info is None:
                    continue
                self.summaries[info] = Summary(
                    return_labels=frozenset(flow.return_labels),
                    seeds={param: frozenset(labels) for param, labels in seeds.get(info, {}).items()},
                )
            self.flows = flows
            after = {info: summary.key() for info, summary in self.summaries.items()}
            if after == before and self.attr_env == attrs_before:
                break

    def flow_of(self, node: ast.AST) -> FunctionFlow:
        """The flow of the function whose body contains ``node`` (module flow for top-level code)."""
        return self.flows[self.index.enclosing_function(node)]

    def labels(self, node: ast.AST) -> Labels:
        return self.flow_of(node).of(node)
