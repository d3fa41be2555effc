"""Artifact validation before a job is queued, in a long-lived helper subprocess.

The reader (`trainer.artifact_metadata.read_submission`: the evaluation's reader plus the metadata sections)
decompresses and checks the whole payload; doing that inside the API process would put each upload's
decompressed tensors (and torch itself) in the memory of the process that must keep answering, and a reader bug
triggered by a hostile file would take the API down with it. So the API talks to `python -m service.api.validation`:
one JSON request line in (the path), one JSON line out (the manifest, or the reader's error code and message). The
helper imports torch once and serves uploads one at a time; if it dies or hangs on a file, that upload is refused
and the next one gets a fresh helper.

The helper runs under OS resource limits (service/api/limits.py): address space and open files for its whole
life, and a CPU allowance renewed before each file, so a file that makes the reader allocate or spin is refused
with `resource_limit` instead of costing the host.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.api.limits import ResourceLimits, breach_reason, child_setup, renew_cpu_allowance
from service.api.settings import subprocess_env
from service.engine.events import allocation_failure_reason

MAX_REPLY_BYTES = 8 << 20  # a manifest is a few KB; a reply near this is itself a sign of a broken helper
# The address-space limit counts reserved memory, and every OpenMP thread reserves a stack and a malloc arena (up to
# 64 MiB): with one thread per core, a 128-core host would spend the validator's 4 GiB before reading a byte.
# Reading one artifact gains little from threads, so the helper runs one, with at most two malloc arenas.
VALIDATOR_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}


@dataclass(frozen=True)
class TokenizerIdentity:
    """What an artifact must have been trained with to be scored on the configured data."""

    sha256: str
    vocab_size: int

    @classmethod
    def of_model_file(cls, path: Path) -> TokenizerIdentity:
        import sentencepiece  # light (no torch)

        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return cls(hashlib.sha256(path.read_bytes()).hexdigest(), int(processor.vocab_size()))


@dataclass(frozen=True)
class ValidationResult:
    manifest: dict[str, Any] | None  # None when the artifact was refused
    code: str = "ok"
    message: str = ""


def is_upstream_manifest(manifest: dict[str, Any]) -> bool:
    """The helper describes an upstream .ptz with ``format: upstream`` in place of a .pgolf manifest."""
    return manifest.get("format") == "upstream"


def tokenizer_mismatch(manifest: dict[str, Any], expected: TokenizerIdentity) -> str | None:
    """Why an artifact cannot be scored with the configured tokenizer, or None when it can.

    An upstream artifact names no tokenizer; its vocabulary size is the one check there is (upstream's scripts
    make the same check against the tokenizer they are run with).
    """
    if is_upstream_manifest(manifest):
        vocab = manifest.get("model_config", {}).get("vocab_size")
        if vocab != expected.vocab_size:
            return f"the upstream model has a vocabulary of {vocab} tokens, the tokenizer has {expected.vocab_size}"
        return None
    declared = manifest.get("tokenizer")
    if not isinstance(declared, dict):
        return "the manifest declares no tokenizer"
    if declared.get("sha256") != expected.sha256:
        return (f"the artifact was trained with tokenizer sha256 {declared.get('sha256')}, but this service "
                f"scores with tokenizer sha256 {expected.sha256}")
    if declared.get("vocab_size") != expected.vocab_size:
        return f"the artifact declares vocab size {declared.get('vocab_size')}, the tokenizer has {expected.vocab_size}"
    return None


class ArtifactValidator:
    """Client of the helper subprocess. One validation at a time; the helper is (re)started on demand."""

    def __init__(self, *, max_file_bytes: int, timeout_seconds: float, limits: ResourceLimits | None = None) -> None:
        self.max_file_bytes = max_file_bytes
        self.timeout_seconds = timeout_seconds
        self.limits = limits or ResourceLimits()
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Start the helper now, so that its imports are done before the first upload arrives."""
        async with self._lock:
            await self._running_process()

    async def close(self) -> None:
        self.kill_now()
        async with self._lock:
            await self._stop()

    def kill_now(self) -> None:
        """At shutdown, from any state: the helper dies now; a validation waiting on it sees it gone."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    async def validate(self, path: Path, *, code: bytes | None = None, env: list[str] | None = None
                       ) -> ValidationResult:
        """Read ``path`` in the helper. With ``code`` (an upstream submission's train_gpt.py) a file that is not a
        .pgolf artifact is read as an upstream .ptz whose config comes from that code and ``env``."""
        async with self._lock:
            process = await self._running_process()
            assert process.stdin is not None and process.stdout is not None
            request = {"path": str(path), "max_file_bytes": self.max_file_bytes, "env": list(env or []),
                       "code_b64": None if code is None else base64.b64encode(code).decode("ascii")}
            try:
                process.stdin.write(json.dumps(request).encode() + b"\n")
                await process.stdin.drain()
                line = await asyncio.wait_for(process.stdout.readline(), self.timeout_seconds)
            except asyncio.TimeoutError:
                await self._stop()
                return ValidationResult(None, "validation_timeout",
                                        f"reading the artifact took longer than {self.timeout_seconds:g} s")
            except (ConnectionError, ValueError):  # helper gone mid-request, or an over-long reply
                line = b""
            except asyncio.CancelledError:  # the client went away mid-request: the helper's reply is now stray
                await self._stop()
                raise
            if not line:
                await self._stop()
                breach = breach_reason(process.returncode, self.limits, "PGOLF_VALIDATOR")
                if breach is not None:
                    return ValidationResult(None, "resource_limit", f"reading the artifact stopped: {breach}")
                return ValidationResult(None, "validator_crashed",
                                        f"the artifact reader died while reading this file (exit status "
                                        f"{process.returncode}); the file was refused")
        try:
            reply = json.loads(line)
        except ValueError:
            return ValidationResult(None, "validator_crashed", "the artifact reader answered garbage; refused")
        if reply["ok"]:
            return ValidationResult(reply["manifest"])
        return ValidationResult(None, str(reply["code"]), str(reply["message"]))

    async def _running_process(self) -> asyncio.subprocess.Process:
        if self._process is None or self._process.returncode is not None:
            # stderr is inherited: the helper's own tracebacks belong in the service log.
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service.api.validation", "--cpu-seconds-per-file", str(self.limits.cpu_seconds),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_REPLY_BYTES,
                env={**subprocess_env(), **VALIDATOR_ENV}, preexec_fn=child_setup(self.limits, renewable_cpu=True),
            )
        return self._process

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


# ----------------------------------------------------------------------------------------------------------------
# helper side: `python -m service.api.validation`, requests on stdin, replies on stdout


def _check(path: Path, max_file_bytes: int, code: bytes | None = None, env: list[str] | None = None
           ) -> dict[str, Any]:
    from trainer.artifact import MAGIC, ArtifactError
    from trainer.artifact_metadata import read_submission  # the reader plus the sections the evaluation skips

    try:
        if code is not None:
            with path.open("rb") as handle:
                if handle.read(len(MAGIC)) != MAGIC:
                    return _check_upstream(path, max_file_bytes, code, env or [])
        artifact = read_submission(path, max_file_bytes=max_file_bytes)
    except ArtifactError as error:
        return {"ok": False, "code": error.code, "message": str(error)}
    except OSError as error:
        return {"ok": False, "code": "unreadable", "message": f"the uploaded file could not be read: {error}"}
    except (MemoryError, RuntimeError) as error:  # an allocation past the address-space limit
        reason = allocation_failure_reason(error)
        if reason is None:
            raise
        return {"ok": False, "code": "resource_limit", "message": f"reading the artifact stopped: {reason}"}
    return {"ok": True, "manifest": artifact.manifest}


def _check_upstream(path: Path, max_file_bytes: int, code: bytes, env: list[str]) -> dict[str, Any]:
    """An upstream .ptz through the safe reader, its config from the submission's code (never run) and env."""
    from trainer.upstream_artifact import read_upstream_artifact
    from trainer.upstream_config import parse_run_env, resolve_upstream_config

    config = resolve_upstream_config(code, parse_run_env(env))
    artifact = read_upstream_artifact(path, config.model_config, max_file_bytes=max_file_bytes)
    return {"ok": True, "manifest": {**artifact.describe(), "settings": config.settings, "notes": config.notes}}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m service.api.validation")
    parser.add_argument("--cpu-seconds-per-file", type=int, default=0, help="CPU allowance per file; 0: none")
    args = parser.parse_args(argv)
    # The default action of SIGXCPU ends the process; make sure an inherited "ignore" does not defeat the limit.
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    import trainer.artifact_metadata  # noqa: F401  (the slow imports, done before the first request)
    import trainer.upstream_artifact  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        renew_cpu_allowance(args.cpu_seconds_per_file)
        code = request.get("code_b64")
        reply = _check(Path(request["path"]), int(request["max_file_bytes"]),
                       None if code is None else base64.b64decode(code), request.get("env"))
        sys.stdout.write(json.dumps(reply, allow_nan=False) + "\n")
        sys.stdout.flush()
        gc.collect()  # the decoded tensors of this file are garbage now; give the memory back before the next
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
