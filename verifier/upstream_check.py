"""``verifier check --upstream``: open an upstream ``final_model.*.ptz`` through the safe reader.

The three artifact rows of ``verifier check`` for an upstream artifact: integrity (the restricted unpickler of
``trainer.upstream_artifact``: no pickle global runs, every storage inside its record, every tensor name and shape
that of the model the submission's config builds), the decompression bound, and the model forward. The config
comes from the submission's ``train_gpt.py`` (among ``--code``), read statically, and the run command's
``--env KEY=VALUE`` settings (``trainer.upstream_config``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from verifier.report import FAIL, PASS, SKIP, CheckResult

# Reader refusals that concern the compressed stream rather than the container inside it.
DECOMPRESSION_CODES = frozenset({"decompression_bomb", "payload_corrupt", "trailing_data", "unknown_compression"})
CONFIG_CODES = frozenset({"bad_submission_code", "unsupported_architecture", "bad_run_env"})


def submission_script(code: Sequence[Path] | None) -> Path | None:
    """The train_gpt.py among the --code paths (or the only file given)."""
    files = [p for p in code or () if p.is_file()]
    named = [p for p in files if p.name == "train_gpt.py"]
    if len(named) == 1:
        return named[0]
    return files[0] if len(files) == 1 else None


def upstream_artifact_checks(path: Path, code: Sequence[Path] | None, env: Sequence[str]) -> list[CheckResult]:
    from trainer.artifact import ArtifactError
    from trainer.upstream_artifact import expected_tensors, raw_limit, read_upstream_artifact
    from trainer.upstream_config import parse_run_env, resolve_upstream_config

    script = submission_script(code)
    if script is None:
        reason = "no single train_gpt.py among --code: the model config cannot be read"
        return [CheckResult("artifact_integrity", FAIL, "", reason),
                CheckResult("decompression_bound", SKIP, "", reason), CheckResult("model_forward", SKIP, "", reason)]
    try:
        config = resolve_upstream_config(script.read_bytes(), parse_run_env(list(env)))
        artifact = read_upstream_artifact(path, config.model_config)
    except ArtifactError as exc:
        refused = f"refused: {exc.code}"
        where = "the config of " + script.name if exc.code in CONFIG_CODES else "the reader"
        decompression = (CheckResult("decompression_bound", FAIL, refused, str(exc))
                         if exc.code in DECOMPRESSION_CODES else
                         CheckResult("decompression_bound", SKIP, "", f"{where} refused it first ({exc.code})"))
        return [CheckResult("artifact_integrity", FAIL, refused, str(exc)), decompression,
                CheckResult("model_forward", SKIP, "", f"the artifact was refused ({exc.code})")]
    limit = raw_limit(expected_tensors(config.model_config))
    integrity = CheckResult(
        "artifact_integrity", PASS,
        f"upstream {artifact.quant_format} + {artifact.compression}, {len(artifact.state_dict)} tensors: restricted "
        f"unpickler (tensors, storages, plain containers only), every name and shape matches the config of "
        f"{script.name}")
    decompression = CheckResult(
        "decompression_bound", PASS,
        f"decompressed to {artifact.raw_nbytes:,} bytes, within the bound {limit:,} derived from the config "
        f"(ratio {artifact.raw_nbytes / max(artifact.file_nbytes, 1):.2f}x)")
    return [integrity, decompression, _forward(artifact)]


def _forward(artifact) -> CheckResult:
    import torch

    from trainer.model import GPT
    from verifier.check import forward_result

    try:
        with torch.device("meta"):
            model = GPT(artifact.model_config)
        model.load_state_dict(dict(artifact.state_dict), strict=True, assign=True)
    except Exception as exc:  # any failure to build the model is the finding
        return CheckResult("model_forward", FAIL, "", f"{type(exc).__name__}: {exc}")
    return forward_result(model.eval())
