"""Upstream .ptz artifacts through `POST /evaluate`: hostile files refused with their codes before queueing,
nothing left on disk, no pickle global run; a real one evaluated end to end with its code and run env."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_harness import AUTH, FAST_ENGINE_ARGS, ServiceData, ServiceProcess, files_under, service_data  # noqa: F401

from tests.test_upstream_artifact import (
    PR940_CODE,
    PR940_ENV,
    config_of,
    hostile_payloads,
    trained_like_weights,
    upstream_file,
)
from tests.upstream_export import mixed_int6_export, upstream_state_dict

ENV_FIELD = " ".join(f"{k}={v}" for k, v in PR940_ENV.items())


@pytest.fixture(scope="module")
def upstream_service(service_data: ServiceData, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
                     ) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("upstream-service")
    with ServiceProcess(root / "storage", service_data, PGOLF_EVAL_ARGS=FAST_ENGINE_ARGS) as process:
        yield process


def post(client: httpx.Client, artifact: bytes, *, code: bytes | None = PR940_CODE.read_bytes(),
         env: str | None = ENV_FIELD, params: dict | None = None) -> httpx.Response:
    files = {"artifact": ("final_model.int6.ptz", artifact, "application/octet-stream")}
    if code is not None:
        files["code"] = ("train_gpt.py", code, "text/x-python")
    return client.post("/evaluate", params=params, files=files, data={"env": env} if env is not None else None)


def test_hostile_upstream_files_are_refused_before_queueing(upstream_service: ServiceProcess, tmp_path: Path):
    config = config_of(PR940_CODE, PR940_ENV)
    good = mixed_int6_export(upstream_state_dict(trained_like_weights(config)))
    canary = tmp_path / "canary"
    payloads = hostile_payloads(canary, config, good)
    with httpx.Client(base_url=upstream_service.url, timeout=120, headers=AUTH) as client:
        for case, data in payloads.items():
            response = post(client, data)
            assert response.status_code == 422, (case, response.text)
            assert response.json()["code"] == case.split("+")[0], (case, response.json())
        refusals = {
            "unsupported_architecture": post(client, payloads["shape_mismatch"], env=ENV_FIELD + " CANON_LAST_N=2"),
            "bad_run_env": post(client, payloads["shape_mismatch"], env="not-an-assignment"),
            "bad_submission_code": post(client, payloads["shape_mismatch"], code=b"def broken(:\n"),
        }
        for code, response in refusals.items():
            assert (response.status_code, response.json()["code"]) == (422, code), response.text
        too_big = post(client, payloads["shape_mismatch"], code=b"#" * 1_000_001)
        assert (too_big.status_code, too_big.json()["code"]) == (413, "code_too_large")
        assert client.get("/evaluations").json() == []
    assert not canary.exists()
    storage = upstream_service.storage_dir
    assert files_under(storage / "uploads") == [] and files_under(storage / "artifacts") == []


def test_an_upstream_artifact_is_evaluated_with_its_code_and_env(upstream_service: ServiceProcess, tmp_path: Path):
    path, _, _ = upstream_file(tmp_path, "int6", "zstd")
    with httpx.Client(base_url=upstream_service.url, timeout=300, headers=AUTH) as client:
        lines = post(client, path.read_bytes(), params={"wait": "true"}).text.splitlines()
        events = [json.loads(line) for line in lines if line]
        assert events[-1]["type"] == "end", events[-1]
        start = next(e for e in events if e["type"] == "start")
        assert start["config"]["model_config"]["num_layers"] == 2
        assert start["config"]["model_config"]["mask_bos"] is False
        job = client.get(f"/evaluations/{events[0]['job_id']}").json()
        assert job["status"] == "completed"
        assert job["options"]["env"] == sorted(f"{k}={v}" for k, v in PR940_ENV.items())
        assert len(job["options"]["code_sha256"]) == 64
    stored = files_under(upstream_service.storage_dir / "artifacts")
    assert sorted(p.suffix for p in stored) == [".ptz", ".py"]
