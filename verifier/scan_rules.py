"""Pattern detectors P1, P2, P4, P5 and the entry point that runs every detector over one source text.

P3 (ordering of adaptation and scoring) lives in ``scan_order``; the shared data flow in ``scan_flow``.

* P1 (C1+C2): a hash key built with the target token (``(ctx_hash ^ (tgt * PRIME)) & mask``) used to *read* a
  count table whose value becomes a score. Count *updates* keyed the same way are how any n-gram table is built
  and are not flagged, nor are full-vocabulary lookups (the candidate ids are ``arange(V)``, not the target) or a
  BigramHash embedding (its key indexes an embedding, it is never read back as a probability).
* P2 (C2): the gold token's model probability added to another quantity that is not itself a gold-indexed value
  of a full distribution, e.g. ``(1-a) * p_model[y] + a * p_ngram``, typically followed by ``-log``.
* P4 (data rule): calibration statistics (GPTQ / AWQ Hessians, activation stats) computed on validation tokens;
  training files / loaders pointed at the validation split; validation tokens written into an artifact.
* P5 (metric): a constant bytes-per-token factor in the bits-per-byte formula instead of per-token byte counts.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable

from trainer.source_syntax import parse_python
from verifier.scan_context import UNKNOWN, ConfigDefaults, LogEvidence, RunContext, reads_environment
from verifier.scan_findings import Finding
from verifier.scan_flow import (
    HKEY,
    MIXED,
    NGOLD,
    SPREAD,
    STAT,
    TGT,
    VAL,
    FunctionFlow,
    ModuleFlow,
    ModuleIndex,
    assigned_names,
    call_basename,
    dotted_name,
    is_val_name,
    is_val_string,
    keyword,
    names_in,
)
from verifier.scan_order import OrderAnalysis, OrderRules
from verifier.scan_shapes import byte_table, pooled_positions

MakeFinding = Callable[..., Finding]  # (pattern, condition, node, confidence, explanation, related=None)

_CALIBRATION = re.compile(
    r"gptq|hessian|calib|awq|smoothquant|act(ivation)?_?stat|collect_(stats|acts|activations|inputs|hess)",
    re.IGNORECASE,
)
_TRAIN_DATA_NAME = re.compile(r"_*train_?(files?|pattern|paths?|glob|shards?|tokens?|loader|data|stream|set|ids)",
                              re.IGNORECASE)
_MODEL_NAME = re.compile(r"model|net\b|module|compiled", re.IGNORECASE)
_ARTIFACT_WRITE = frozenset({"compress", "save", "savez", "savez_compressed", "tofile", "dump", "dumps"})
_BPB_NAME = re.compile(r"bpb|bits_per_byte", re.IGNORECASE)
_BPT_NAME = re.compile(
    r"_*(bytes?_per_tok(en)?s?|tok(en)?s?_per_bytes?|avg_bytes(_per_tok(en)?)?|bpt|mean_bytes_per_tok(en)?)",
    re.IGNORECASE,
)
_BYTE_COUNT = re.compile(r"byte", re.IGNORECASE)
_LOSS_TEXT = re.compile(r"loss|nll|nats|bits|entropy", re.IGNORECASE)
_LOG_CALLS = frozenset({"log", "log2", "log10", "log1p"})
# Numbers that legitimately appear in a bpb formula: unit conversions, not a bytes-per-token estimate.
_CONVERSIONS = (1.0, 2.0, 8.0, math.log(2.0), 1.0 / math.log(2.0), 0.5)


def analyse_source(
    source: str,
    filename: str,
    origin: str | None = None,
    env_overrides: dict[str, str] | None = None,
    tree: ast.Module | None = None,
    evidence: LogEvidence | None = None,
) -> list[Finding]:
    """Run every detector over one (already unwrapped) source text, parsed with the Python 3.12 grammar.
    ``evidence``: the record's training logs, which show branches that ran although the defaults switch them off."""
    tree = tree if tree is not None else parse_python(source)
    index = ModuleIndex(tree, source)
    flow = ModuleFlow(index)
    defaults = ConfigDefaults(index, env_overrides or {})
    context = RunContext(index, defaults, evidence)

    def make_finding(pattern: str, condition: str, node: ast.AST, confidence: str, explanation: str,
                     related: ast.AST | None = None) -> Finding:
        """A finding at ``node``; ``related`` is the other half of a two-event violation (the update of an
        adapt-then-score pair): when either half sits in code the defaults do not run, the finding is lowered."""
        line = getattr(node, "lineno", 0)
        finding = Finding(pattern, condition, filename, line, index.line(line), confidence, explanation, origin)
        steps, reason = max(context.downgrade(node), context.downgrade(related) if related is not None else (0, ""),
                            key=lambda step: step[0])
        return finding.downgraded(steps, reason)

    findings: list[Finding] = []
    for function_flow in flow.flows.values():
        findings += target_in_key(function_flow, make_finding)
        findings += gold_only_mixing(function_flow, make_finding)
        findings += validation_calibration(function_flow, index, defaults, make_finding)
        findings += bytes_per_token_constant(function_flow, defaults, make_finding)
    findings += OrderRules(OrderAnalysis(index, flow), make_finding).findings()
    findings += byte_table(index.nodes, make_finding)
    findings += pooled_positions(index.nodes, make_finding)
    return _deduplicate(findings)


def _nodes(flow: FunctionFlow) -> list[ast.AST]:
    """Every node of the flow's own code: nested functions excluded, class bodies (configuration) included.
    Computed once per flow (several rules walk it)."""
    cached = getattr(flow, "_rule_nodes", None)
    if cached is not None:
        return cached
    found: list[ast.AST] = []
    pending: list[ast.AST] = list(flow.body)
    while pending:
        node = pending.pop()
        found.append(node)
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                pending.append(child)
    flow._rule_nodes = found  # type: ignore[attr-defined]
    return found


def _deduplicate(findings: list[Finding]) -> list[Finding]:
    best: dict[tuple[str, int], Finding] = {}
    for finding in findings:
        key = (finding.pattern, finding.line)
        if key not in best or finding.sort_key() < best[key].sort_key():
            best[key] = finding
    return sorted(best.values(), key=lambda f: (f.line, f.pattern))


# ----------------------------------------------------------------------------------------------------------------
# P1: target token inside an n-gram lookup key
# ----------------------------------------------------------------------------------------------------------------


def _reaches_score(flow: FunctionFlow, label: str) -> bool:
    """Does a value carrying ``label`` become part of a score: a log, a mixture, a loss sum or the result?"""
    if label in flow.return_labels:
        return True
    if any(label in flow.of(arg) for arg in flow.log_args):
        return True
    if any(label in flow.of(site) for site in flow.mix_sites):
        return True
    for node in _nodes(flow):
        if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add) and label in flow.of(node.value):
            return True
    return False


def target_in_key(flow: FunctionFlow, make_finding: MakeFinding) -> list[Finding]:
    if not flow.hkey_reads or not _reaches_score(flow, NGOLD):
        return []
    findings: list[Finding] = []
    reported: set[int] = set()
    for read in flow.hkey_reads:
        key = read.slice if isinstance(read, ast.Subscript) else _gather_index(read)
        construction = _key_construction(flow, key) or read
        line = getattr(construction, "lineno", 0)
        if line in reported:
            continue
        reported.add(line)
        target = _target_names(flow, construction)
        key_text = ast.unparse(key) if key is not None else "the key"
        findings.append(make_finding(
            "P1", "C1+C2", construction, "high",
            f"the target token {target} is hashed into the n-gram key read at line {read.lineno} "
            f"({key_text}); the table returns a count for the realised token only, not a distribution over the "
            f"vocabulary (ruled invalid on PR #779)",
        ))
    return findings


def _gather_index(call: ast.Call) -> ast.expr | None:
    index = keyword(call, "index") or keyword(call, "indices")
    if index is not None:
        return index
    if call_basename(call) in {"take", "take_along_axis", "take_along_dim"} and len(call.args) >= 2:
        return call.args[1]
    return call.args[-1] if call.args else None


def _key_construction(flow: FunctionFlow, key: ast.expr | None) -> ast.stmt | None:
    """The assignment that built the hashed key used in ``key`` (``full_key = (... ^ (tgt * P)) & mask``)."""
    if key is None:
        return None
    wanted = names_in(key)
    for node in _nodes(flow):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in wanted for t in targets) and HKEY in flow.of(node.value):
                return node
    return None


def _target_names(flow: FunctionFlow, node: ast.AST) -> str:
    value = node.value if isinstance(node, (ast.Assign, ast.AugAssign)) else node
    names = [sub for sub in ast.walk(value) if isinstance(sub, (ast.Name, ast.Subscript)) and TGT in flow.of(sub)]
    if not names:
        return "(the predicted token)"
    return f"`{ast.unparse(min(names, key=lambda n: len(ast.unparse(n))))}`"


# ----------------------------------------------------------------------------------------------------------------
# P2: only the gold token's probability is mixed
# ----------------------------------------------------------------------------------------------------------------


def gold_only_mixing(flow: FunctionFlow, make_finding: MakeFinding) -> list[Finding]:
    if not flow.mix_sites:
        return []
    scored = _reaches_score(flow, MIXED) or MIXED in flow.return_labels
    findings: list[Finding] = []
    seen: set[int] = set()
    for site in flow.mix_sites:
        line = getattr(site, "lineno", 0)
        if line in seen:
            continue
        seen.add(line)
        labels = flow.of(site)
        if NGOLD in labels:
            other = "an n-gram estimate read with a target-keyed hash"
        elif SPREAD in labels:
            other = ("a byte-level model, per byte, after spreading the token's probability evenly over its bytes "
                     "(those per-byte shares are not a distribution over the next byte)")
        elif STAT in labels:
            other = "a statistic of the model's distribution (such as its entropy) used as an 'expert'"
        else:
            other = "another estimate"
        findings.append(make_finding(
            "P2", "C2", site, "high" if scored else "medium",
            f"the model's probability of the gold token alone is blended with {other}; no full-vocabulary "
            f"mixture or renormalisation, so the implied distribution need not sum to 1"
            + ("" if scored else " (the blend is not seen reaching a log-loss in this function)"),
        ))
    return findings


# ----------------------------------------------------------------------------------------------------------------
# P4: calibration / training on validation data
# ----------------------------------------------------------------------------------------------------------------


def validation_calibration(
    flow: FunctionFlow, index: ModuleIndex, defaults: ConfigDefaults, make_finding: MakeFinding
) -> list[Finding]:
    findings: list[Finding] = []
    params = set(flow.info.all_params) if flow.info is not None else set()
    in_calibration = flow.info is not None and bool(_CALIBRATION.search(flow.info.name))
    for node in _nodes(flow):
        if isinstance(node, ast.Call):
            name = dotted_name(node.func) or call_basename(node)
            arguments = [*node.args, *(kw.value for kw in node.keywords)]
            # Models are excluded: a model object can pick up a validation label through an opaque call
            # (train_model(h, val_data)), but calibration is only about the token data it is fed.
            val_args = [arg for arg in arguments if VAL in flow.of(arg) and not _MODEL_NAME.search(ast.unparse(arg))]
            if _CALIBRATION.search(call_basename(node)) and val_args:
                findings.append(make_finding(
                    "P4", "data", node, "high",
                    f"quantisation calibration `{name}` runs on validation data "
                    f"(`{ast.unparse(val_args[0])}`): calibrating on unscored eval tokens breaks autoregressivity",
                ))
            elif call_basename(node) in _ARTIFACT_WRITE and any(
                any(is_val_name(n) for n in names_in(arg)) for arg in val_args
            ):
                findings.append(make_finding(
                    "P4", "data", node, "medium",
                    "validation tokens are serialised / compressed here; storing them in the artifact is a "
                    "'paid prefix'",
                ))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            names = assigned_names(node)
            value_labels = flow.of(node.value)
            configured = defaults.evaluate(node.value) if reads_environment(node.value) else UNKNOWN
            if isinstance(configured, str) and is_val_string(configured) and \
                    any(_TRAIN_DATA_NAME.fullmatch(name) for name in names):
                # TRAIN_FILES=fineweb_val_*.bin in the run command: the default says train, the run said val.
                findings.append(make_finding(
                    "P4", "data", node, "high",
                    f"training data `{names[0]}` is taken from the validation split as configured for the run "
                    f"(`{configured}`)",
                ))
                continue
            if VAL not in value_labels:
                continue
            if any(_TRAIN_DATA_NAME.fullmatch(name) for name in names):
                findings.append(make_finding(
                    "P4", "data", node, "high",
                    f"training data `{names[0]}` is taken from the validation split",
                ))
            elif in_calibration and flow.info is not None and not (names_in(node.value) & params):
                findings.append(make_finding(
                    "P4", "data", node, "high",
                    f"the calibration routine {flow.info.name}() loads validation data itself",
                ))
    return findings


# ----------------------------------------------------------------------------------------------------------------
# P5: hard-coded bytes-per-token constant
# ----------------------------------------------------------------------------------------------------------------


def bytes_per_token_constant(flow: FunctionFlow, defaults: ConfigDefaults, make_finding: MakeFinding) -> list[Finding]:
    findings: list[Finding] = []
    for node in _nodes(flow):
        if not isinstance(node, (ast.Assign, ast.AnnAssign, ast.Return)) or node.value is None:
            continue
        names = ["return"] if isinstance(node, ast.Return) else assigned_names(node)
        operands = _scaling_operands(node.value)
        if not operands:
            continue
        bpb_context = any(_BPB_NAME.search(name) for name in names) or bool(_BPB_NAME.search(ast.unparse(node.value)))
        for operand, partner, divides in operands:
            constant = _constant_factor(operand, defaults)
            if constant is None:
                continue
            value, described = constant
            scales_a_loss = bool(_LOSS_TEXT.search(ast.unparse(partner)))
            if isinstance(operand, ast.Constant):
                # A bare number only counts where it converts a loss into bits per byte.
                flagged = (bpb_context or scales_a_loss) and (divides or scales_a_loss) \
                    and not _mentions_byte_counts(node.value)
            else:
                flagged = bpb_context or scales_a_loss
            if flagged:
                findings.append(make_finding(
                    "P5", "metric", node, "high",
                    f"bits per byte computed with a fixed bytes-per-token factor {described} = {value:g} instead "
                    f"of the exact byte count of every scored target token",
                ))
                break
    return findings


def _scaling_operands(expr: ast.expr) -> list[tuple[ast.expr, ast.expr, bool]]:
    """(factor, the numerator factors it scales, factor is a divisor) for every factor of every product / quotient
    outside ``log(...)`` calls. Products are flattened, so ``loss / (math.log(2) * 3.5)`` makes 3.5 a divisor
    of ``loss`` just as ``loss / math.log(2) / 3.5`` does."""
    operands: list[tuple[ast.expr, ast.expr, bool]] = []
    pending = [expr]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Call) and call_basename(node) in _LOG_CALLS:
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            factors: list[tuple[ast.expr, bool]] = []
            _flatten_product(node, False, factors)
            for position, (factor, divides) in enumerate(factors):
                # A divisor divides the numerator's factors; a numerator factor scales the other numerator factors.
                others = ast.Tuple(elts=[other for i, (other, other_divides) in enumerate(factors)
                                         if i != position and not other_divides], ctx=ast.Load())
                operands.append((factor, others, divides))
            pending.extend(factor for factor, _ in factors)
            continue
        pending.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.expr))
    return operands


def _flatten_product(node: ast.expr, divides: bool, out: list[tuple[ast.expr, bool]]) -> None:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        _flatten_product(node.left, divides, out)
        _flatten_product(node.right, divides, out)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        _flatten_product(node.left, divides, out)
        _flatten_product(node.right, not divides, out)
    else:
        out.append((node, divides))


def _constant_factor(operand: ast.expr, defaults: ConfigDefaults) -> tuple[float, str] | None:
    """A bytes-per-token style constant: a bare float literal, or a BYTES_PER_TOKEN-like name with a literal value."""
    if isinstance(operand, ast.Constant) and isinstance(operand.value, float):
        value = operand.value
        if 1.2 <= value <= 8.0 and not any(math.isclose(value, c, rel_tol=1e-3) for c in _CONVERSIONS):
            return value, "literal"
        if 0.125 <= value < 0.85 and not any(math.isclose(value, c, rel_tol=1e-3) for c in _CONVERSIONS):
            return value, "literal"
        return None
    name = operand.id if isinstance(operand, ast.Name) else operand.attr if isinstance(operand, ast.Attribute) else None
    if name is None or not _BPT_NAME.fullmatch(name):
        return None
    value = defaults.values.get(name, UNKNOWN)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), f"`{name}`"
    return None


def _mentions_byte_counts(expr: ast.expr) -> bool:
    return any(_BYTE_COUNT.search(name) for name in names_in(expr))
