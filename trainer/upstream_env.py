"""Environment names that upstream ``train_gpt.py`` scripts read, found statically, and what each means to pgolf.

``env_reads(tree)`` lists every ``os.environ.get(NAME, DEFAULT)`` / ``os.getenv`` / ``os.environ[NAME]`` in a
parsed script, with its literal default. Nothing of the script runs.

Two consumers classify the names:

* the trainer (``trainer.config``): every name an upstream script reads is honoured (mapped to a field) or
  refused; a name for a feature pgolf has fixed is accepted only at the value that matches pgolf's behaviour
  (``SWA_ENABLED=0`` passes, ``SWA_ENABLED=1`` is an error);
* the upstream artifact reader (``trainer.upstream_config``): the architecture names build the ModelConfig, and
  the names listed in ``NON_ARCHITECTURE_NAMES`` cannot change the trained network's forward pass.

The tables below were derived from the scripts of the root ``train_gpt.py`` baseline and the 11-layer records
(PR #287/#315/#414/#549, the #761/#940 fork); ``tests/test_upstream_config.py`` re-derives them from the real
submissions in the verifier corpus and fails on any name that is in neither table.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ENV_ITEMS = 64
MAX_ENV_VALUE_CHARS = 256
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")


@dataclass(frozen=True)
class EnvRead:
    name: str
    default: str | None  # the literal default as a string, None when there is none or it is computed
    line: int


def parse_env_assignments(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (the CLI's repeated ``--env``, the API's ``env`` field) to a bounded dict.

    Raises ValueError naming the first bad item. Torch-free: the HTTP service validates ``env`` before queueing.
    """
    if len(items) > MAX_ENV_ITEMS:
        raise ValueError(f"{len(items)} environment settings; at most {MAX_ENV_ITEMS}")
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _ENV_NAME.fullmatch(key):
            raise ValueError(f"{item[:80]!r} is not KEY=VALUE with an upper-case KEY")
        if len(value) > MAX_ENV_VALUE_CHARS:
            raise ValueError(f"{key}: value longer than {MAX_ENV_VALUE_CHARS} characters")
        if key in env and env[key] != value.strip():
            raise ValueError(f"{key} is set twice with different values")
        env[key] = value.strip()
    return env


def _is_os_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name)
            and node.value.id == "os") or (isinstance(node, ast.Name) and node.id == "environ")


def _is_getenv(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "getenv" and isinstance(node.value, ast.Name)
            and node.value.id == "os") or (isinstance(node, ast.Name) and node.id == "getenv")


def _literal(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
        value = node.value
        return str(int(value)) if isinstance(value, bool) else str(value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        inner = _literal(node.operand)
        return None if inner is None else f"-{inner}"
    return None


def env_reads(tree: ast.AST) -> dict[str, EnvRead]:
    """Every environment name the script reads, first read first; a later literal default fills a missing one."""
    reads: dict[str, EnvRead] = {}
    for node in ast.walk(tree):
        name_node: ast.expr | None = None
        default: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            is_get = isinstance(func, ast.Attribute) and func.attr in ("get", "setdefault") and _is_os_environ(
                func.value)
            if is_get or _is_getenv(func):
                name_node = node.args[0]
                default = node.args[1] if len(node.args) > 1 else None
        elif isinstance(node, ast.Subscript) and _is_os_environ(node.value):
            name_node = node.slice
        if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
            continue
        name = name_node.value
        literal = _literal(default)
        known = reads.get(name)
        if known is None or (known.default is None and literal is not None):
            reads[name] = EnvRead(name, literal, getattr(node, "lineno", 0))
    return dict(sorted(reads.items(), key=lambda item: item[1].line))


# --------------------------------------------------------------------------------------------------------------
# Names that shape the network. The upstream artifact reader maps these (trainer/upstream_config.py).
ARCHITECTURE_NAMES = (
    "VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "TIE_EMBEDDINGS",
    "ROPE_BASE", "ROPE_DIMS", "LOGIT_SOFTCAP", "XSA_LAST_N", "LN_SCALE", "VALUE_RESIDUAL", "GATED_ATTENTION",
    "BIGRAM_VOCAB_SIZE", "BIGRAM_DIM", "LEAKY_RELU", "LEAKY_SLOPE", "CANON_LAST_N", "VE_ENABLED", "VE_DIM",
    "VE_LAYERS",
)

# Names that cannot change the forward pass of the network an artifact holds: data and run plumbing, optimiser
# and schedule, initialisation (the artifact holds the trained values), training-only heads and QAT (excluded
# from export / no effect on the stored weights), export knobs, and evaluation-time settings (pgolf's evaluator
# has its own options for those).
NON_ARCHITECTURE_NAMES = frozenset({
    # data and run plumbing
    "DATA_PATH", "TOKENIZER_PATH", "RUN_ID", "SEED", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SHARD_ORDER_FILE",
    "VAL_BATCH_SIZE", "VAL_LOSS_EVERY", "TRAIN_LOG_EVERY", "ITERATIONS", "WARMDOWN_ITERS", "WARMUP_STEPS",
    "TRAIN_BATCH_TOKENS", "TRAIN_SEQ_LEN", "MAX_WALLCLOCK_SECONDS",
    # optimiser and initialisation
    "EMBED_LR", "HEAD_LR", "TIED_EMBED_LR", "TIED_EMBED_INIT_STD", "MATRIX_LR", "SCALAR_LR", "MUON_MOMENTUM",
    "MUON_BACKEND_STEPS", "MUON_MOMENTUM_WARMUP_START", "MUON_MOMENTUM_WARMUP_STEPS", "BETA1", "BETA2",
    "ADAM_EPS", "GRAD_CLIP_NORM", "MUON_BETA2", "MUON_WD", "ADAM_WD", "QK_GAIN_INIT", "CANON_KERNEL",
    "CANON_DELTA_GATE_INIT",
    # weight averaging, QAT and training-only heads
    "SWA_ENABLED", "SWA_EVERY", "EMA_ENABLED", "EMA_DECAY", "QAT_ENABLED", "LATE_QAT", "QAT_THRESHOLD",
    "SOFT_ROUND_QAT", "MTP_NUM_HEADS", "MTP_LOSS_WEIGHT",
    # export
    "CONTROL_TENSOR_NAME_PATTERNS", "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS", "INT6_MLP_LAYERS", "ZSTD_LEVEL",
    # evaluation-time settings
    "EVAL_SEQ_LEN", "EVAL_STRIDE", "TTT_ENABLED", "TTT_LR", "TTT_EPOCHS", "TTT_MOMENTUM", "TTT_BATCH_SEQS",
    "TTT_FREEZE_BLOCKS", "TTT_CHUNK_TOKENS", "NGRAM_CACHE", "NGRAM_ALPHA", "NGRAM_MIN_COUNT", "NGRAM_ORDER",
    "NGRAM_MIN_ORDER", "NGRAM_BUCKETS", "NGRAM_ENTROPY", "NGRAM_ENT_BASE", "NGRAM_ENT_RANGE", "NGRAM_ENT_SCALE",
    "NGRAM_ENT_THRESH",
})
