"""The ModelConfig of an upstream artifact, read statically from its submission's ``train_gpt.py``.

The script is never imported or executed. Self-extracting wrappers are peeled by ``trainer.source_unwrap``; the
decoded source is parsed with ``ast``. Each setting's value is, later ones winning: the literal default of the
script's ``os.environ.get(NAME, DEFAULT)`` (in ``Hyperparameters`` or anywhere else: #761/#940 read
``LEAKY_SLOPE`` inside ``MLP``), a wrapper's ``os.environ.setdefault``, and the ``--env KEY=VALUE`` settings of the
run command. Values are read the way upstream reads them (``int(...)``, ``float(...)``, ``bool(int(...))``).

Behaviour with no environment switch is read from the code itself, conservatively:

* parameter-bearing parts (SmearGate, BigramHash, value residual, gated attention, U-Net skips) are on when the
  script's switch says so, or, without a switch, when the script defines them; the artifact's tensor names are
  then checked against the model this builds, so a mismatch is refused by name rather than mis-evaluated;
* the MLP activation comes from ``LEAKY_RELU`` / ``LEAKY_SLOPE`` or the literal slope of the script's
  ``leaky_relu`` call, else ``relu`` (slope 0);
* the NTK RoPE rescale is on when the script builds ``Rotary(..., train_seq_len=N)`` (upstream hard-codes 1024);
  scripts whose Rotary has no such parameter (the root baseline) never rescale;
* XSA, partial RoPE and LN scale without their switch are refused if the script mentions them at all.

Upstream models are evaluated as upstream ran them: no BOS masking of SmearGate/BigramHash (``mask_bos=False``).
Settings that change the network in ways pgolf's model cannot express are refused, naming them.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field

from trainer.artifact import ArtifactError
from trainer.model import ModelConfig
from trainer.source_syntax import parse_python
from trainer.source_unwrap import UnwrapError, unwrap
from trainer.upstream_env import ARCHITECTURE_NAMES, NON_ARCHITECTURE_NAMES, env_reads, parse_env_assignments

MAX_CODE_BYTES = 1_000_000  # a real train_gpt.py is under 120 kB; the whole submission is capped at 16 MB
# rope_train_seq_len that no evaluation reaches: Rotary without the NTK quirk never rescales its base.
NO_NTK_RESCALE = 1 << 30

# Architecture settings pgolf's model cannot express, with the value (as upstream parses it) at which they are
# off. Any other value is refused.
UNSUPPORTED_UNLESS_OFF: dict[str, tuple[str, object]] = {
    "CANON_LAST_N": ("Canon AC convolutions (canon_a / canon_c tensors)", 0),
    "VE_ENABLED": ("value embeddings (ve_shared tensors)", False),
    "NUM_LOOPS": ("depth recurrence (blocks run more than once)", 0),
    "LOOP_START": ("depth recurrence", None),
    "PARALLEL_START_LAYER": ("parallel residual lanes", None),
    "PARALLEL_RESIDUAL_START": ("parallel residual lanes", None),
    "DEPTH_RECURRENCE_SRC": ("depth recurrence", None),
    "TRIGRAM": ("a trigram hash embedding", False),
    "SKIP_GATES_ENABLED": ("gated U-Net skips", False),
    "ATTN_OUT_GATE_ENABLED": ("an attention output gate", False),
    "SPARSE_ATTN_GATE_ENABLED": ("a sparse attention gate", False),
    "GATED_XSA": ("gated XSA", False),
    "ROPE_YARN": ("YaRN RoPE scaling", False),
    "SQUAREGLU_ENABLED": ("a SquareGLU MLP", False),
    "MOD_ENABLED": ("mixture-of-depths routing", False),
    "MULTI_EXIT_ENABLED": ("multi-exit heads", False),
    "LOCAL_SHARED_BLOCKS": ("shared local blocks", None),
}


class BadSubmissionCode(ArtifactError):
    code = "bad_submission_code"


class UnsupportedArchitecture(ArtifactError):
    code = "unsupported_architecture"


class BadRunEnv(ArtifactError):
    code = "bad_run_env"


@dataclass(frozen=True)
class UpstreamConfig:
    model_config: ModelConfig
    settings: dict[str, str]  # the effective value of every architecture name the script reads
    notes: list[str] = field(default_factory=list)


def parse_run_env(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    try:
        return parse_env_assignments(items)
    except ValueError as exc:
        raise BadRunEnv(str(exc)) from None


def decode_source(code: str | bytes) -> tuple[str, dict[str, str], list[str]]:
    """(innermost source, wrapper env defaults, notes) of a submission script; nothing of it runs."""
    if isinstance(code, bytes):
        if len(code) > MAX_CODE_BYTES:
            raise BadSubmissionCode(f"train_gpt.py is {len(code)} bytes (at most {MAX_CODE_BYTES})")
        try:
            code = code.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadSubmissionCode(f"train_gpt.py is not UTF-8: {exc}") from None
    if len(code) > MAX_CODE_BYTES:
        raise BadSubmissionCode(f"train_gpt.py is {len(code)} characters (at most {MAX_CODE_BYTES})")
    try:
        unwrapped = unwrap(code)
    except (UnwrapError, SyntaxError, ValueError, RecursionError) as exc:
        raise BadSubmissionCode(f"train_gpt.py cannot be decoded statically: {exc}") from None
    notes = [f"decoded {layer.describe()}" for layer in unwrapped.layers] + list(unwrapped.notes)
    return unwrapped.source, dict(unwrapped.env_overrides), notes


def resolve_upstream_config(code: str | bytes, env: Mapping[str, str] | None = None) -> UpstreamConfig:
    source, wrapper_env, notes = decode_source(code)
    try:
        tree = parse_python(source)  # Python 3.12 f-strings too, whatever interpreter runs pgolf
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise BadSubmissionCode(f"train_gpt.py does not parse: {exc}") from None
    reads = env_reads(tree)
    run_env = dict(env or {})
    for key in run_env:
        if key not in reads:
            notes.append(f"{key} is set but the script never reads it: no effect")

    def value(name: str) -> str | None:
        if name in run_env and name in reads:
            return run_env[name]
        if name in wrapper_env:
            return wrapper_env[name]
        return reads[name].default if name in reads else None

    _refuse_unsupported(reads, value)
    unknown = [n for n in reads if n not in ARCHITECTURE_NAMES and n not in NON_ARCHITECTURE_NAMES
               and n not in UNSUPPORTED_UNLESS_OFF]
    if unknown:
        notes.append(f"settings not interpreted (assumed not to change the network; the tensor check still "
                     f"applies): {', '.join(unknown[:20])}{'…' if len(unknown) > 20 else ''}")
    reader = _SourceFacts(tree, source)
    config = _build(reader, reads, value)
    settings = {name: str(value(name)) for name in ARCHITECTURE_NAMES if name in reads}
    return UpstreamConfig(config, settings, notes)


# ---- values, read as upstream reads them ----------------------------------------------------------------------


def _as_int(name: str, raw: str | None) -> int:
    try:
        return int(str(raw).strip())
    except ValueError:
        pass
    try:
        as_float = float(str(raw))
    except ValueError:
        raise BadRunEnv(f"{name}={raw!r} is not an integer") from None
    if not as_float.is_integer():
        raise BadRunEnv(f"{name}={raw!r} is not an integer")
    return int(as_float)


def _as_float(name: str, raw: str | None) -> float:
    try:
        result = float(str(raw))
    except ValueError:
        raise BadRunEnv(f"{name}={raw!r} is not a number") from None
    if result != result or result in (float("inf"), float("-inf")):
        raise BadRunEnv(f"{name}={raw!r} is not a finite number")
    return result


def _as_bool(name: str, raw: str | None) -> bool:
    text = str(raw).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    return bool(_as_int(name, text))


def _refuse_unsupported(reads: Mapping[str, object], value) -> None:
    for name, (what, off) in UNSUPPORTED_UNLESS_OFF.items():
        if name not in reads:
            continue
        raw = value(name)
        if raw is None or str(raw).strip() == "":
            continue
        if off is None:
            raise UnsupportedArchitecture(f"{name}={raw}: {what} is not something pgolf's model can express")
        parsed = _as_bool(name, raw) if isinstance(off, bool) else _as_int(name, raw)
        if parsed != off:
            raise UnsupportedArchitecture(f"{name}={raw}: {what} is not something pgolf's model can express")


# ---- facts about the code without a switch ------------------------------------------------------------------


class _SourceFacts:
    def __init__(self, tree: ast.AST, source: str) -> None:
        self.tree = tree
        self.source = source
        self.classes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}

    def mentions(self, word: str) -> bool:
        return word in self.source

    def leaky_slopes(self) -> set[float | None]:
        """Slopes of every ``leaky_relu`` call: a float for a literal, None for anything computed."""
        slopes: set[float | None] = set()
        for node in ast.walk(self.tree):
            if not (isinstance(node, ast.Call) and _func_name(node) == "leaky_relu"):
                continue
            arg = next((k.value for k in node.keywords if k.arg == "negative_slope"), None)
            if arg is None and len(node.args) > 1:
                arg = node.args[1]
            if arg is None:
                slopes.add(0.01)  # torch's default
            elif isinstance(arg, ast.Constant) and isinstance(arg.value, (int, float)):
                slopes.add(float(arg.value))
            else:
                slopes.add(None)
        return slopes

    def calls_relu(self) -> bool:
        return any(isinstance(node, ast.Call) and _func_name(node) == "relu" for node in ast.walk(self.tree))

    def rotary_train_seq_len(self) -> int | None:
        """The NTK reference length upstream's Rotary is built with, or None for a Rotary without the quirk."""
        rotary = self.classes.get("Rotary")
        if rotary is None:
            raise UnsupportedArchitecture("the script defines no Rotary class; pgolf's model needs RoPE")
        init = next((n for n in rotary.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        params = [a.arg for a in init.args.args] if init is not None else []
        if "train_seq_len" not in params:
            return None
        passed = {_literal_int(k.value) for node in ast.walk(self.tree)
                  if isinstance(node, ast.Call) and _func_name(node) == "Rotary"
                  for k in node.keywords if k.arg == "train_seq_len"}
        if not passed and init is not None:  # the default of the parameter
            defaults = dict(zip(params[len(params) - len(init.args.defaults):], init.args.defaults, strict=True))
            passed = {_literal_int(defaults["train_seq_len"])} if "train_seq_len" in defaults else {None}
        if len(passed) != 1 or None in passed:
            raise UnsupportedArchitecture("the script builds Rotary with a train_seq_len pgolf cannot read "
                                          "statically (NTK RoPE rescaling)")
        return passed.pop()


def _func_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _literal_int(node: ast.expr) -> int | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    return None


# ---- the config -------------------------------------------------------------------------------------------------


def _build(facts: _SourceFacts, reads: Mapping[str, object], value) -> ModelConfig:
    def required(name: str) -> str:
        raw = value(name)
        if raw is None:
            raise UnsupportedArchitecture(f"the script reads no {name} default; its model shape is not readable")
        return raw

    vocab_size = _as_int("VOCAB_SIZE", required("VOCAB_SIZE"))
    num_layers = _as_int("NUM_LAYERS", required("NUM_LAYERS"))
    model_dim = _as_int("MODEL_DIM", required("MODEL_DIM"))
    num_heads = _as_int("NUM_HEADS", required("NUM_HEADS"))
    num_kv_heads = _as_int("NUM_KV_HEADS", required("NUM_KV_HEADS"))
    mlp_mult = _as_float("MLP_MULT", required("MLP_MULT"))
    if not mlp_mult.is_integer() or mlp_mult < 1:
        raise UnsupportedArchitecture(f"MLP_MULT={value('MLP_MULT')}: pgolf's MLP width is a whole multiple of "
                                      f"the model dim")
    if "TIE_EMBEDDINGS" in reads and not _as_bool("TIE_EMBEDDINGS", value("TIE_EMBEDDINGS")):
        raise UnsupportedArchitecture("TIE_EMBEDDINGS=0: an untied lm_head is not something pgolf's model has")
    if model_dim < 1 or num_heads < 1 or num_kv_heads < 1 or model_dim % num_heads:
        raise UnsupportedArchitecture(f"MODEL_DIM={model_dim} / NUM_HEADS={num_heads} do not give a head dim")
    head_dim = model_dim // num_heads

    def switch(name: str, fallback: bool) -> bool:
        return _as_bool(name, value(name)) if name in reads and value(name) is not None else fallback

    def parameterless(name: str, marker: str, off: object) -> str | None:
        if name in reads and value(name) is not None:
            return value(name)
        if facts.mentions(marker):
            raise UnsupportedArchitecture(f"the script uses {marker} without a {name} setting; pgolf cannot tell "
                                          f"from the code where it applies")
        return None if off is None else str(off)

    xsa = parameterless("XSA_LAST_N", "xsa", 0)
    rope_dims_raw = parameterless("ROPE_DIMS", "rope_dims", 0)
    rope_dims = _as_int("ROPE_DIMS", rope_dims_raw) or head_dim
    ln_scale = _as_bool("LN_SCALE", parameterless("LN_SCALE", "ln_scale", 0))

    bigram_buckets = 0
    bigram_dim = 128
    if "BIGRAM_VOCAB_SIZE" in reads:
        bigram_buckets = _as_int("BIGRAM_VOCAB_SIZE", value("BIGRAM_VOCAB_SIZE"))
        if bigram_buckets:
            if "BIGRAM_DIM" not in reads:
                raise UnsupportedArchitecture("the script has BigramHash but no BIGRAM_DIM setting")
            bigram_dim = _as_int("BIGRAM_DIM", value("BIGRAM_DIM"))
    elif facts.mentions("BigramHash"):
        raise UnsupportedArchitecture("the script has BigramHash but no BIGRAM_VOCAB_SIZE setting")

    train_seq_len = facts.rotary_train_seq_len()
    try:
        return ModelConfig(
            vocab_size=vocab_size, num_layers=num_layers, model_dim=model_dim, num_heads=num_heads,
            num_kv_heads=num_kv_heads, mlp_mult=int(mlp_mult), leaky_relu_slope=_leaky_slope(facts, reads, value),
            rope_dims=rope_dims, rope_base=_as_float("ROPE_BASE", value("ROPE_BASE") or 10000.0),
            rope_train_seq_len=NO_NTK_RESCALE if train_seq_len is None else train_seq_len,
            logit_softcap=_as_float("LOGIT_SOFTCAP", value("LOGIT_SOFTCAP") or 30.0),
            qk_gain_init=_as_float("QK_GAIN_INIT", value("QK_GAIN_INIT") or 1.5),
            xsa_last_n=_as_int("XSA_LAST_N", xsa),
            value_residual=switch("VALUE_RESIDUAL", facts.mentions("vr_lambda")),
            gated_attention=switch("GATED_ATTENTION", facts.mentions("attn_gate")),
            smear_gate=facts.mentions("SmearGate"),
            bigram_buckets=bigram_buckets, bigram_dim=bigram_dim, ln_scale=ln_scale,
            unet_skips=facts.mentions("skip_weights"), mask_bos=False, bos_id=min(1, vocab_size - 1),
        )
    except ValueError as exc:  # GPT's own validation is run by the reader; a frozen dataclass cannot fail here
        raise UnsupportedArchitecture(str(exc)) from None


def _leaky_slope(facts: _SourceFacts, reads: Mapping[str, object], value) -> float:
    """LeakyReLU slope of the MLP: 0.0 is relu² (the baseline's ``torch.relu``)."""
    if "LEAKY_RELU" in reads and not _as_bool("LEAKY_RELU", value("LEAKY_RELU")):
        if not facts.calls_relu():
            raise UnsupportedArchitecture("LEAKY_RELU=0 but the script has no relu fallback pgolf recognises")
        return 0.0
    if "LEAKY_SLOPE" in reads:
        return _as_float("LEAKY_SLOPE", value("LEAKY_SLOPE"))
    slopes = facts.leaky_slopes()
    if not slopes:
        if facts.calls_relu():
            return 0.0
        raise UnsupportedArchitecture("the script's MLP activation is neither relu nor leaky_relu")
    if len(slopes) != 1 or None in slopes:
        raise UnsupportedArchitecture(f"the script's leaky_relu slope is not one literal ({sorted(map(str, slopes))})")
    return float(next(iter(slopes)))  # type: ignore[arg-type]
