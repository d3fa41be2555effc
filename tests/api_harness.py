"""Shared pieces of the service tests: a real uvicorn subprocess, real artifacts, hostile artifacts.

Every service test talks HTTP to `python -m service serve` on 127.0.0.1, started as a subprocess on a free
port with its configuration in the environment, exactly as an operator runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_EVALUATOR = Path(__file__).resolve().parent / "fake_evaluator.py"
TEST_ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
# Small enough to read on 2 CPU cores in a second, big enough to have every kind of tensor of the real model.
TINY_MODEL = {"num_layers": 2, "model_dim": 64, "num_heads": 2, "num_kv_heads": 1, "mlp_mult": 2,
              "bigram_buckets": 64, "bigram_dim": 16, "xsa_last_n": 2}
# Every test service has this admin token (PGOLF_API_TOKEN) unless a test configures its users otherwise.
ADMIN_TOKEN = "pgolf-test-admin-token-0001"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Engine knobs for a fast real evaluation: a preview of the first tokens in chunks of 1024 tokens.
FAST_ENGINE_ARGS = "--device cpu --seq-len 256 --stride 128 --chunk-tokens 1024 --max-tokens 3073"


@dataclass(frozen=True)
class ServiceData:
    data_dir: Path
    tokenizer: Path


def shared_sample_dir() -> Path:
    env = os.environ.get("PGOLF_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "fineweb_sample"


@pytest.fixture(scope="session")
def service_data(tmp_path_factory: pytest.TempPathFactory) -> ServiceData:
    """Validation data and tokenizer: the FineWeb sample when present, else the offline embedded corpus."""
    sample = shared_sample_dir()
    tokenizer = sample / "tokenizers" / "fineweb_1024_bpe.model"
    if tokenizer.is_file():
        return ServiceData(sample / "datasets" / "fineweb10B_sp1024", tokenizer)
    from trainer.data.embedded import build_embedded

    out = tmp_path_factory.mktemp("embedded")
    build_embedded(out, log=lambda _message: None)
    return ServiceData(out, out / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_artifact(service_data: ServiceData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_artifact(tmp_path_factory.mktemp("artifacts") / "tiny.pgolf", service_data.tokenizer)


def write_tiny_artifact(path: Path, tokenizer: Path, *, seed: int = 0, tokenizer_sha256: str | None = None) -> Path:
    """A real artifact of a randomly initialised tiny GPT, trained with `tokenizer` as far as the manifest says
    (or with a tokenizer of hash `tokenizer_sha256`)."""
    import torch

    from trainer.code_bytes import counted_code_bytes
    from trainer.export import write_artifact
    from trainer.model import GPT, ModelConfig

    torch.manual_seed(seed)
    config = ModelConfig(**TINY_MODEL)
    model = GPT(config)
    import sentencepiece

    vocab_size = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    training = {"seed": seed, "steps": 0, "world_size": 1, "device": "cpu", "train_time_ms": 0.0,
                "code_version": "test"}
    tokenizer_sha256 = tokenizer_sha256 or hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    write_artifact(path, model.state_dict(), config, tokenizer_sha256, vocab_size, training,
                   code_bytes=counted_code_bytes())
    return path


def hostile_artifacts(valid: Path, out_dir: Path) -> dict[str, Path]:
    """Files the reader must refuse: random bytes, a pickle, a zstd bomb, and a payload with one byte flipped."""
    import zstandard
    from test_artifact import assemble, split

    data = valid.read_bytes()
    manifest, payload = split(data)
    raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=manifest["payload"]["raw_nbytes"])
    # The bomb: a consistent manifest (hashes of what is really there) whose payload inflates 64 MiB past its
    # declared size; only a bounded decompression notices.
    bomb_payload = zstandard.ZstdCompressor(level=3).compress(raw + bytes(64 << 20))
    bomb_manifest = json.loads(json.dumps(manifest))
    bomb_manifest["payload"].update(compressed_nbytes=len(bomb_payload),
                                    compressed_sha256=hashlib.sha256(bomb_payload).hexdigest())
    tampered = bytearray(data)
    tampered[-20] ^= 0xFF
    files = {
        "garbage": random.Random(0).randbytes(4096),
        "pickle": pickle.dumps({"weights": list(range(100))}, protocol=4),
        "bomb": assemble(bomb_manifest, bomb_payload),
        "tampered": bytes(tampered),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, content in files.items():
        paths[name] = out_dir / f"{name}.pgolf"
        paths[name].write_bytes(content)
    return paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServiceProcess:
    """`python -m service serve` in a subprocess; `url` is its base address."""

    def __init__(self, storage_dir: Path, data: ServiceData, **env: str) -> None:
        self.storage_dir = storage_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PGOLF_DATA_DIR": str(data.data_dir),
            "PGOLF_TOKENIZER": str(data.tokenizer),
            "PGOLF_STORAGE_DIR": str(storage_dir),
            "PGOLF_PORT": str(self.port),
            "PGOLF_API_TOKEN": ADMIN_TOKEN,
            **env,
        }
        self.log_path = storage_dir.parent / f"{storage_dir.name}-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=REPO_ROOT, env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """Die like a crashed host: SIGKILL, no shutdown code runs."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def child_pids(self) -> list[int]:
        """Direct children of the server process (evaluator and validator subprocesses)."""
        assert self.process is not None
        children: list[int] = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            text = (task / "children").read_text().split()
            children.extend(int(pid) for pid in text)
        return children

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def fake_evaluator_env(script: Path) -> dict[str, str]:
    """Settings that make the service run tests/fake_evaluator.py, scripted by `script`, instead of the engine."""
    return {"PGOLF_EVALUATOR": f"{sys.executable} {FAKE_EVALUATOR}", "PGOLF_EVAL_ARGS": f"--script {script}"}


def set_fake_behaviour(script: Path, **behaviour: object) -> None:
    """What the next fake evaluation does (read by the fake when it starts)."""
    script.write_text(json.dumps(behaviour))


def upload(client: httpx.Client, artifact: Path, *, params: dict | None = None, data: dict | None = None,
           headers: dict | None = None) -> httpx.Response:
    with artifact.open("rb") as handle:
        return client.post("/evaluate", params=params, data=data, headers=headers,
                           files={"artifact": (artifact.name, handle, "application/octet-stream")})


def stream_events(client: httpx.Client, method: str, path: str, **kwargs: object) -> Iterator[dict]:
    with client.stream(method, path, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line:
                yield json.loads(line)


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/evaluations/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {statuses}; last: {job}")


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once `pid` has exited (a zombie awaiting its reaper counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False
