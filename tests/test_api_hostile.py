"""Hostile uploads and results against the real service: OS resource limits of the validator and evaluator
subprocesses, the bomb manifest, and non-finite results.

The limits are real rlimits set in real children (service/api/limits.py); a breach must be a clean refusal
(validator: 422 `resource_limit`) or a `failed` job whose reason names the limit (evaluator), and the service
keeps answering. The address-space limits are set relative to what this machine's Python + torch actually maps,
measured first, so the tests hold on any host.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_harness import (  # noqa: F401  (service_data and tiny_artifact are fixtures)
    AUTH,
    REPO_ROOT,
    ServiceData,
    ServiceProcess,
    fake_evaluator_env,
    service_data,
    set_fake_behaviour,
    tiny_artifact,
    upload,
    wait_for_status,
)

from service.api.limits import ResourceLimits, breach_reason, child_setup

MiB = 1 << 20
# Headroom above the measured footprint of reading the tiny artifact. Reading the big artifact below needs several
# times this (its 72 MB payload is decompressed, copied and dequantised to fp32), reading the tiny one needs none.
HEADROOM_BYTES = 160 * MiB


def _vm_peak_after(code: str) -> int:
    """Peak address space (VmPeak) of a fresh Python that ran ``code``, in bytes."""
    script = code + "\nprint(next(l for l in open('/proc/self/status') if l.startswith('VmPeak')).split()[1])"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1]) * 1024


def write_big_zero_artifact(path: Path, tokenizer: Path) -> Path:
    """A valid artifact of a 72M-parameter model whose weights are all zero: 72 MB of payload, a few kB on disk.

    The kind of upload that made the validator and evaluator grow by gigabytes: legitimate, within every bound
    of the format, and only the rlimits stop it from costing more than the operator allows.
    """
    import hashlib

    import numpy as np
    import sentencepiece
    import torch

    from trainer.code_bytes import CodeBytes
    from trainer.encodings import RAW, RAW_NUMPY_DTYPES, ROW_QMAX, SCALE_DTYPE, STORAGE_DTYPE, QuantizedTensor, num_rows
    from trainer.export import encode_artifact
    from trainer.model import GPT, ModelConfig
    from trainer.quant import choose_encoding, dtype_name

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    config = ModelConfig(vocab_size=vocab, num_layers=8, model_dim=1024, num_heads=8, num_kv_heads=4, mlp_mult=3,
                         xsa_last_n=8, bigram_buckets=64, bigram_dim=16)
    with torch.device("meta"):
        state = GPT(config).state_dict()
    tensors = []
    for name, t in state.items():
        encoding, shape = choose_encoding(name, t), tuple(t.shape)
        storage = RAW_NUMPY_DTYPES[dtype_name(t.dtype)] if encoding == RAW else STORAGE_DTYPE[encoding]
        scales = np.ones(num_rows(shape), dtype=SCALE_DTYPE) if encoding in ROW_QMAX else None
        tensors.append(QuantizedTensor(name, encoding, dtype_name(t.dtype), shape,
                                       np.zeros(math.prod(shape), dtype=storage), scales))
    training = {"seed": 0, "steps": 0, "world_size": 1, "device": "cpu", "train_time_ms": 0.0, "code_version": "t"}
    data = encode_artifact(tensors, model_config=config, tokenizer_sha256=hashlib.sha256(tokenizer.read_bytes())
                           .hexdigest(), vocab_size=vocab, training=training,
                           code_bytes=CodeBytes(1000, {"train_gpt.py": 1000}), level=3)
    path.write_bytes(data)
    return path


def bomb_manifest_artifact(valid: Path, out: Path, num_layers: int) -> Path:
    """The tiny artifact with model_config.num_layers replaced (the manifest is not hashed; nothing else changes)."""
    from test_artifact import assemble, split  # here, not at the top: test_artifact imports torch

    manifest, payload = split(valid.read_bytes())
    manifest["model_config"]["num_layers"] = num_layers
    out.write_bytes(assemble(manifest, payload))
    return out


@pytest.fixture(scope="module")
def big_artifact(service_data: ServiceData, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return write_big_zero_artifact(tmp_path_factory.mktemp("big") / "zeros.pgolf", service_data.tokenizer)


@pytest.fixture(scope="module")
def reader_footprint(tiny_artifact: Path) -> int:  # noqa: F811
    """Address space a fresh Python needs to import the reader and read the tiny artifact."""
    return _vm_peak_after(f"from trainer.artifact import read_artifact; read_artifact({str(tiny_artifact)!r})")


class LimitedService:
    def __init__(self, process: ServiceProcess, script: Path) -> None:
        self.process, self.script = process, script
        self.client = httpx.Client(base_url=process.url, timeout=60, headers=AUTH)

    def validator_pid(self) -> int:
        for pid in self.process.child_pids():
            if b"service.api.validation" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        raise AssertionError("no validator subprocess is running")


@pytest.fixture(scope="module")
def limited(service_data: ServiceData, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
            reader_footprint: int) -> Iterator[LimitedService]:
    root = tmp_path_factory.mktemp("limited-service")
    script = root / "behaviour.json"
    env = {**fake_evaluator_env(script), "PGOLF_QUEUE_BOUND": "2", "PGOLF_KILL_GRACE_SECONDS": "0.5",
           "PGOLF_VALIDATOR_ADDRESS_SPACE_BYTES": str(reader_footprint + HEADROOM_BYTES),
           "PGOLF_EVALUATOR_CPU_SECONDS": "1", "OMP_NUM_THREADS": "1"}
    with ServiceProcess(root / "storage", service_data, **env) as process:
        service = LimitedService(process, script)
        yield service
        service.client.close()


def _status_kib(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


@pytest.mark.parametrize(("num_layers", "code"), [(10**30, "manifest_not_json"), (10**18, "schema_violation")])
def test_bomb_manifest_is_refused_without_growing_the_validator(
    limited: LimitedService, tiny_artifact: Path, tmp_path: Path, num_layers: int, code: str,  # noqa: F811
) -> None:
    """num_layers = 10**30 once reached set(range(num_layers)): 1.5 GB in 6 s. Now a bound refuses it first.
    (Its time, well under a second, is printed by bench/fuzz_artifact.py; here the memory is asserted.)"""
    warm_up = tmp_path / "garbage.pgolf"
    warm_up.write_bytes(b"not an artifact")  # answered only once the helper has finished its imports
    assert upload(limited.client, warm_up, params={"wait": "false"}).json()["code"] == "bad_magic"
    pid = limited.validator_pid()
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    rss_before = _status_kib(pid, "VmRSS")
    bomb = bomb_manifest_artifact(tiny_artifact, tmp_path / "bomb.pgolf", num_layers)
    response = upload(limited.client, bomb, params={"wait": "false"})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert "num_layers" in response.json()["message"] or code == "manifest_not_json"
    assert limited.validator_pid() == pid  # the same helper answered: it neither died nor was killed
    assert (_status_kib(pid, "VmHWM") - rss_before) * 1024 < 200 * MiB


def test_validator_over_its_address_space_refuses_cleanly_then_reads_the_next_upload(
    limited: LimitedService, big_artifact: Path, tiny_artifact: Path,  # noqa: F811
) -> None:
    response = upload(limited.client, big_artifact, params={"wait": "false"})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "resource_limit", body
    assert "address-space limit" in body["message"]
    set_fake_behaviour(limited.script, chunks=1, chunk_seconds=0.05)
    accepted = upload(limited.client, tiny_artifact, params={"wait": "false", "force": "true"})
    assert accepted.status_code == 202, accepted.text
    wait_for_status(limited.client, accepted.json()["id"], {"completed"})


def test_evaluator_over_its_cpu_limit_fails_the_job_with_that_reason(
    limited: LimitedService, tiny_artifact: Path,  # noqa: F811
) -> None:
    set_fake_behaviour(limited.script, chunks=2, chunk_seconds=0.05, spin_seconds=30)
    response = upload(limited.client, tiny_artifact, params={"wait": "false", "force": "true"})
    assert response.status_code == 202, response.text
    job = wait_for_status(limited.client, response.json()["id"], {"completed", "failed", "timeout"}, timeout=60)
    assert job["status"] == "failed", job
    assert "CPU-time limit of 1 s" in job["reason"] and "PGOLF_EVALUATOR_CPU_SECONDS" in job["reason"]
    assert job["result"]["code"] == "resource_limit"
    assert limited.client.get("/healthz").status_code == 200


def test_engine_over_its_address_space_reports_resource_limit(
    big_artifact: Path, service_data: ServiceData, reader_footprint: int,  # noqa: F811
) -> None:
    """The real engine, started under the limits the service applies, ends with an `error` event naming the limit
    (which the service turns into a `failed` job with that reason) instead of being killed or swapping."""
    limits = ResourceLimits(address_space_bytes=reader_footprint + 2 * HEADROOM_BYTES, cpu_seconds=300)
    process = subprocess.run(
        [sys.executable, "-m", "service", "evaluate", str(big_artifact), "--data", str(service_data.data_dir),
         "--tokenizer", str(service_data.tokenizer), "--device", "cpu", "--max-tokens", "2049", "--no-ttt"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, preexec_fn=child_setup(limits),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    events = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    assert process.returncode == 1, process.stderr[-2000:]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "resource_limit", events[-1:]
    assert "address-space limit" in events[-1]["reason"]


def test_limits_apply_in_the_child_and_never_raise_a_hard_limit() -> None:
    code = ("import resource, os\n"
            "print(resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_CPU),"
            " resource.getrlimit(resource.RLIMIT_NOFILE))\n"
            "try:\n"
            "    [os.open('/dev/null', os.O_RDONLY) for _ in range(100)]\n"
            "except OSError as e:\n"
            "    print('errno', e.errno)\n")
    limits = ResourceLimits(address_space_bytes=8 << 30, cpu_seconds=7, open_files=32)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=child_setup(limits)).stdout.split("\n")
    assert out[0] == f"({8 << 30}, {8 << 30}) (7, 12) (32, 32)"
    assert out[1] == f"errno {errno.EMFILE}"
    # A hard limit already lower than asked (the operator's) is kept.
    nested = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            preexec_fn=child_setup(ResourceLimits(open_files=4096),
                                                   lambda: ResourceLimits(open_files=64).apply())).stdout
    assert "(64, 64)" in nested


def test_a_non_finite_result_fails_the_job_and_every_stream_stays_strict_json(
    limited: LimitedService, tiny_artifact: Path,  # noqa: F811
) -> None:
    set_fake_behaviour(limited.script, chunks=2, chunk_seconds=0.05, nan_result=True)
    response = upload(limited.client, tiny_artifact, params={"wait": "false", "force": "true"})
    assert response.status_code == 202, response.text
    job = wait_for_status(limited.client, response.json()["id"], {"completed", "failed", "timeout"})
    assert job["status"] == "failed" and "non-finite" in job["reason"], job
    assert job["result"]["code"] == "non_finite"
    assert job["result"]["targets_scored"] == 2000  # the figures of the two chunks before it
    body = limited.client.get(f"/evaluations/{job['id']}/events").text
    events = [json.loads(line, parse_constant=_refuse) for line in body.splitlines() if line]
    assert [e["type"] for e in events] == ["queued", "start", "chunk", "chunk", "error"]


def _refuse(name: str) -> float:
    raise AssertionError(f"{name} in a stream: not JSON")


def test_a_renewable_cpu_allowance_keeps_a_long_lived_helper_alive_and_still_stops_a_runaway() -> None:
    """The validator renews its soft RLIMIT_CPU before each file: files that each fit the allowance never add up
    to a kill, and one file that spins past it is ended by SIGXCPU, which the service names as the CPU limit."""
    code = ("import time\n"
            "from service.api.limits import renew_cpu_allowance\n"
            "def spin(seconds):\n"  # pure user time; the clock is read only now and then
            "    end = time.process_time() + seconds\n"
            "    while time.process_time() < end:\n"
            "        sum(range(20000))\n"
            "for file in range(4):\n"
            "    renew_cpu_allowance(1)\n"
            "    spin(0.6)\n"
            "    print('file', file, flush=True)\n"
            "renew_cpu_allowance(1)\n"
            "spin(5)\n"
            "print('survived', flush=True)\n")
    limits = ResourceLimits(cpu_seconds=1)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=child_setup(limits, renewable_cpu=True))
    assert done.stdout.split("\n")[:4] == [f"file {i}" for i in range(4)], done.stderr
    assert "survived" not in done.stdout
    assert done.returncode == -signal.SIGXCPU
    assert "CPU-time limit of 1 s" in breach_reason(done.returncode, limits, "PGOLF_VALIDATOR")
