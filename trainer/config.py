"""Training configuration: typed dataclasses, the two presets, and overrides.

Every field can be set three ways, later ones winning: the preset, an environment variable with the reference
name (``NUM_LAYERS=11``, ``MATRIX_LR=0.025`` — existing upstream scripts keep working), and a CLI flag
(``--num-layers 11``). An environment variable that names an upstream knob we deliberately do not implement
(SWA, late QAT, MTP heads, …) is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from trainer.limits import TRAIN_LIMIT_SECONDS
from trainer.model import ModelConfig
from trainer.quant import EXPORT_SCHEMES


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 1337
    train_batch_tokens: int = 786_432  # global tokens per optimiser step, whatever the world size
    train_seq_len: int = 2048
    grad_accum_base: int = 8  # grad_accum_steps = grad_accum_base // world_size (reference: 8)
    iterations: int = 9000
    max_wallclock_seconds: float = TRAIN_LIMIT_SECONDS  # training-time cap; 0 disables it
    warmdown_iters: int = 3000  # wall-clock warmdown: the last warmdown_iters × mean step time before the cap
    warmup_steps: int = 20  # priming steps (compile, allocator), rolled back and kept outside the timer
    matrix_lr: float = 0.025
    scalar_lr: float = 0.025
    tied_embed_lr: float = 0.035
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_wd: float = 0.04
    adam_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    ema_decay: float = 0.997  # 0 disables EMA
    val_loss_every: int = 4000  # 0: validate only at the start and the end
    val_batch_tokens: int = 524_288
    train_log_every: int = 200
    compile: bool = True  # torch.compile on CUDA (ignored on CPU, where it only costs time)
    export_scheme: str = "pgolf"  # "pgolf" (per-row clip search) or "seed" (PR #940's export as it ran)


PRESETS: dict[str, TrainConfig] = {
    # PR #940 as submitted: the full stack, 786,432 tokens/step at seq 2048, 600 s on 8×H100.
    "pr940": TrainConfig(),
    # Every component of the full stack, scaled to train on the embedded corpus on 2 CPU cores in ≤ 3 minutes.
    "demo": TrainConfig(
        model=ModelConfig(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=3,
                          bigram_buckets=1024, bigram_dim=32, xsa_last_n=4, rope_dims=16),
        train_batch_tokens=4096, train_seq_len=256, grad_accum_base=1, iterations=2000,
        max_wallclock_seconds=120.0, warmdown_iters=60, warmup_steps=2, matrix_lr=0.04, scalar_lr=0.04,
        tied_embed_lr=0.05, muon_momentum_warmup_steps=50, val_loss_every=50, val_batch_tokens=16_384,
        ema_decay=0.95,  # 0.997 averages over ~300 steps: longer than the whole demo run
        train_log_every=25, compile=False),
}

# Reference environment names whose field name differs from the lower-cased variable.
ENV_ALIASES = {"BIGRAM_VOCAB_SIZE": "bigram_buckets", "VAL_BATCH_SIZE": "val_batch_tokens",
               "MUON_MOMENTUM_WARMUP_START": "muon_momentum_warmup_start", "LEAKY_SLOPE": "leaky_relu_slope"}


@dataclass(frozen=True)
class EnvRule:
    """What pgolf does with an upstream name that has no field of its own.

    ``accepts``: the values (as upstream parses them) at which upstream behaves exactly as pgolf always does; any
    other value is refused with ``why``. ``None`` accepts every value: the name has no effect given the behaviour
    pgolf fixes (``why`` says which). ``maps``: value -> field overrides, for names that select a field value.
    """

    why: str
    accepts: tuple[str, ...] | None = ()
    maps: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()


_EVAL = "an evaluation setting: pass it to `python -m service evaluate` (--seq-len, --stride, --ttt, --ngram)"
# Every name that upstream's root train_gpt.py, the 11-layer records (#287/#315/#414) and the #761/#940 fork read
# and that is not a field above. tests/test_config_env.py re-derives the names from those scripts.
UPSTREAM_ENV: dict[str, EnvRule] = {
    # switches whose "on" pgolf implements, whose "off" pgolf can honour through a field
    "LEAKY_RELU": EnvRule("LEAKY_RELU=0 is relu², i.e. leaky_relu_slope 0", ("1",),
                          (("0", (("leaky_relu_slope", 0.0),)),)),
    "EMA_ENABLED": EnvRule("EMA_ENABLED=0 is ema_decay 0", ("1",), (("0", (("ema_decay", 0.0),)),)),
    # features pgolf fixes: accepted only at the value that matches
    "TIE_EMBEDDINGS": EnvRule("untied embeddings (an lm_head) are not implemented", ("1",)),
    "SWA_ENABLED": EnvRule("SWA is accumulated but never applied upstream (reference §5.5); not implemented", ("0",)),
    "LATE_QAT": EnvRule("late QAT is a no-op upstream (reference §5.5); not implemented", ("0",)),
    "QAT_ENABLED": EnvRule("QAT is not implemented", ("0",)),
    "SOFT_ROUND_QAT": EnvRule("soft-round QAT is not implemented", ("0",)),
    "MTP_NUM_HEADS": EnvRule("MTP heads are excluded from export upstream; not implemented", ("0",)),
    "CANON_LAST_N": EnvRule("Canon AC convolutions are not implemented", ("0",)),
    "VE_ENABLED": EnvRule("value embeddings are not part of PR #940 (reference §4.2)", ("0",)),
    "DTG_ENABLED": EnvRule("dynamic token gating is not implemented", ("0",)),
    "TTT_ENABLED": EnvRule("test-time training belongs to evaluation: use `python -m service evaluate --ttt`",
                           ("0",)),
    "NGRAM_CACHE": EnvRule("n-gram mixing belongs to evaluation: use `python -m service evaluate --ngram`", ("0",)),
    "ZSTD_LEVEL": EnvRule("the export ladder tries zstd 16, 1, 17, 2 (reference §6.4) and is not configurable",
                          ("16",)),
    "INT6_MLP_LAYERS": EnvRule("the baseline's int6 MLP layers are not configurable: pgolf quantises every block "
                               "matrix to int6", ("",)),
    "SHARD_ORDER_FILE": EnvRule("training shards are read in sorted order; a custom order is not implemented", ("",)),
    # no effect given what pgolf fixes (as upstream: the same value does nothing there either)
    "EMBED_LR": EnvRule("used upstream only with untied embeddings, which are fixed off", None),
    "HEAD_LR": EnvRule("used upstream only with an untied lm_head, which is fixed off", None),
    "MTP_LOSS_WEIGHT": EnvRule("used upstream only with MTP heads, which are fixed off", None),
    "SWA_EVERY": EnvRule("used upstream only with SWA, which is fixed off", None),
    "CANON_KERNEL": EnvRule("used upstream only with Canon layers, which are fixed off", None),
    "CANON_DELTA_GATE_INIT": EnvRule("used upstream only with Canon layers, which are fixed off", None),
    "QAT_THRESHOLD": EnvRule("used upstream only with late QAT, which is fixed off", None),
    "LATE_QAT_THRESHOLD": EnvRule("used upstream only with late QAT, which is fixed off", None),
    "VE_DIM": EnvRule("used upstream only with value embeddings, which are fixed off", None),
    "VE_LAYERS": EnvRule("used upstream only with value embeddings, which are fixed off", None),
    "MUON_BETA2": EnvRule("read by the #761/#940 script but never used by its Muon", None),
    "RANK": EnvRule("set by torchrun; read by the process group", None),
    "WORLD_SIZE": EnvRule("set by torchrun; read by the process group", None),
    "LOCAL_RANK": EnvRule("set by torchrun; read by the process group", None),
    # run plumbing that pgolf takes as flags
    "DATA_PATH": EnvRule("pass the shard directory as --data"),
    "TOKENIZER_PATH": EnvRule("pass the tokenizer as --tokenizer"),
    "RUN_ID": EnvRule("pgolf names its outputs by --out"),
    "CONTROL_TENSOR_NAME_PATTERNS": EnvRule("the control-tensor patterns are PR #940's and not configurable"),
    "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS": EnvRule("the fp32 passthrough patterns are PR #940's and not "
                                                  "configurable"),
    # evaluation-time settings
    **{name: EnvRule(_EVAL) for name in (
        "EVAL_SEQ_LEN", "EVAL_STRIDE", "EVAL_ONLY", "TTT_LR", "TTT_EPOCHS", "TTT_MOMENTUM", "TTT_BATCH_SEQS",
        "TTT_FREEZE_BLOCKS", "TTT_CHUNK_TOKENS", "NGRAM_ALPHA", "NGRAM_MIN_COUNT", "NGRAM_ORDER", "NGRAM_MIN_ORDER",
        "NGRAM_BUCKETS", "NGRAM_ENTROPY", "NGRAM_ENT_BASE", "NGRAM_ENT_RANGE", "NGRAM_ENT_SCALE",
        "NGRAM_ENT_THRESH")},
}


class ConfigError(ValueError):
    pass


def _field_types(cls: type) -> dict[str, Any]:
    hints = {f.name: f.type for f in fields(cls)}
    # `from __future__ import annotations` leaves types as strings; map them back to the builtins we use.
    names = {"int": int, "float": float, "bool": bool, "str": str}
    return {k: names.get(v, v) if isinstance(v, str) else v for k, v in hints.items()}


MODEL_FIELDS = _field_types(ModelConfig)
TRAIN_FIELDS = {k: v for k, v in _field_types(TrainConfig).items() if k != "model"}
ALL_FIELDS = {**MODEL_FIELDS, **TRAIN_FIELDS}


def parse_value(name: str, raw: str, source: str | None = None) -> Any:
    """Read ``raw`` as the type of field ``name``; errors name ``source`` (e.g. the environment variable)."""
    kind = ALL_FIELDS[name]
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(float(raw)) if float(raw).is_integer() else int(raw)
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{source or name}: cannot read {raw!r} as {kind.__name__}") from None


def _same_value(raw: str, accepted: str) -> bool:
    """Upstream parses these names with int()/float()/bool(int()): compare as numbers where both are numbers."""
    try:
        return float(raw) == float(accepted)
    except ValueError:
        return raw.strip() == accepted


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Field values named by reference environment variables; upstream names pgolf cannot honour are errors."""
    out: dict[str, Any] = {}
    mapped: dict[str, Any] = {}  # from switches, applied last: LEAKY_RELU=0 wins over LEAKY_SLOPE, as upstream
    for key, raw in environ.items():
        rule = UPSTREAM_ENV.get(key)
        if rule is not None:
            for value, changes in rule.maps:
                if _same_value(raw, value):
                    mapped.update(changes)
                    break
            else:
                if rule.accepts is not None and not any(_same_value(raw, v) for v in rule.accepts):
                    raise ConfigError(f"{key}={raw}: {rule.why}")
            continue
        name = ENV_ALIASES.get(key, key.lower())
        if key.isupper() and name in ALL_FIELDS:
            out[name] = parse_value(name, raw, source=key)
    return {**out, **mapped}


def apply_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    unknown = sorted(set(overrides) - set(ALL_FIELDS))
    if unknown:
        raise ConfigError(f"unknown configuration field(s): {', '.join(unknown)}")
    model_changes = {k: v for k, v in overrides.items() if k in MODEL_FIELDS}
    train_changes = {k: v for k, v in overrides.items() if k in TRAIN_FIELDS}
    return replace(config, model=replace(config.model, **model_changes), **train_changes)


def resolve_config(preset: str, cli_overrides: Mapping[str, Any] | None = None,
                   environ: Mapping[str, str] | None = None) -> TrainConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    config = apply_overrides(PRESETS[preset], env_overrides(os.environ if environ is None else environ))
    config = apply_overrides(config, cli_overrides or {})
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    m = config.model
    if m.model_dim % m.num_heads or m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model_dim {m.model_dim} / heads {m.num_heads} / kv heads {m.num_kv_heads} do not divide")
    if m.rope_dims > m.model_dim // m.num_heads or m.rope_dims % 2:
        raise ConfigError(f"rope_dims {m.rope_dims} must be even and at most the head dim")
    if config.train_batch_tokens % config.train_seq_len:
        raise ConfigError("train_batch_tokens must be a multiple of train_seq_len")
    if config.export_scheme not in EXPORT_SCHEMES:
        raise ConfigError(f"export_scheme must be one of {', '.join(EXPORT_SCHEMES)}, got {config.export_scheme!r}")
    if config.max_wallclock_seconds < 0 or config.iterations <= 0:
        raise ConfigError("iterations must be positive and max_wallclock_seconds non-negative")


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
