"""Loading an upstream ``.ptz`` submission for the engine: its model config from the submission's own
train_gpt.py and run env, its weights through the safe reader (trainer/upstream_artifact.py).

Only a ``.ptz`` evaluation imports this module (lazily, from ``run.load_inputs``), so it is not counted code: an
upstream submission's counted code is its own train_gpt.py (trainer/code_bytes.py ``NOT_COUNTED``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from service.engine.options import EvalOptions
from service.engine.run import EvalInputError, LoadedModel, SubmissionSize
from trainer.artifact import ArtifactError
from trainer.data.byte_accounting import ByteTables
from trainer.upstream_artifact import load_upstream_model
from trainer.upstream_config import parse_run_env, resolve_upstream_config


def load_upstream(options: EvalOptions, artifact_path: Path, device: torch.device, tables: ByteTables,
                  tokenizer_path: Path) -> LoadedModel:
    """What ``run._load_pgolf`` returns, for a .ptz; the training sequence length is the run env's TRAIN_SEQ_LEN
    (None: upstream's own default).

    Upstream artifacts carry no tokenizer identity; the vocabulary size is the only check possible (upstream's
    own scripts make the same one against the tokenizer they are given).
    """
    if options.code is None:
        raise EvalInputError("code_required", f"{artifact_path.name} is an upstream artifact: pass the submission's "
                                              f"train_gpt.py (--code) so its model config can be read")
    env = parse_run_env(list(options.env))
    try:
        code = Path(options.code).read_bytes()
        config = resolve_upstream_config(code, env)
        model, artifact = load_upstream_model(artifact_path, config.model_config, device=device)
    except OSError as exc:
        raise EvalInputError("bad_artifact", f"cannot read {exc.filename}: {exc.strerror}") from exc
    except ArtifactError as exc:
        raise EvalInputError(exc.code, f"upstream artifact refused: {exc}") from exc
    model_config = asdict(artifact.model_config)
    if model_config["vocab_size"] != tables.vocab_size:
        raise EvalInputError(
            "tokenizer_mismatch",
            f"the upstream model has a vocabulary of {model_config['vocab_size']} tokens, but the data's "
            f"tokenizer {tokenizer_path} has {tables.vocab_size}; refusing to score it on this data")
    notes = [f"upstream artifact: {artifact.quant_format} + {artifact.compression}", *config.notes]
    # The rule counts bytes(train_gpt.py) + bytes(compressed model) (compliance-rules §7.1).
    size = SubmissionSize(artifact.file_nbytes, len(code), f"{Path(options.code).name} (--code)")
    seq_len = env.get("TRAIN_SEQ_LEN", "")
    train_seq_len = int(seq_len) if seq_len.isdigit() and int(seq_len) > 0 else None
    return model, model_config, artifact.file_sha256, size, train_seq_len, notes
